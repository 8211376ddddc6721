"""Every model family end to end through the real broker: a PDF is uploaded with kcat,
split, embedded by the family's tiny RANDOM WEIGHTS checkpoint (the real
``from_pretrained`` path of its colpali-engine classes), stored, and a text query,
embedded with the index's own model, answers with its pages.

One parametrized test, tiny models and a 2-page PDF keep it affordable on two cores;
it is marked slow (about half a minute per family)."""

from __future__ import annotations

from pathlib import Path

import pytest

from colstream.embedding.families import FAMILY_NAMES
from colstream.infra.settings import ColstreamSettings
from tests.conftest import make_settings
from tests.fixtures.docs import make_pdf
from tests.harness import kcat_produce, pipeline_in_threads, upload_line, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_indexes_a_pdf_and_answers_a_search(
    family: str, tmp_path: Path, kafka_bootstrap: str, model_cache: Path
) -> None:
    from colstream.cli.search import search_store
    from colstream.embedding.profile import index_model_for
    from colstream.embedding.tiny import ensure_tiny_checkpoint
    from colstream.infra.kafka import ensure_topics

    checkpoint = ensure_tiny_checkpoint(family, model_cache)
    settings: ColstreamSettings = make_settings(tmp_path, kafka_bootstrap, checkpoint)
    settings = settings.updated(model={"family": family})
    ensure_topics(settings)
    dim = index_model_for(settings.model).dim
    pdf = settings.blob.local_root / "report.pdf"
    pdf.write_bytes(make_pdf(2))

    with pipeline_in_threads(settings) as store:
        kcat_produce(settings, settings.topics.uploads, [upload_line("report", pdf.resolve().as_uri(),
                                                                     filename="report.pdf")])
        record = wait_for(lambda: (r := store.get_records(["report"]).get("report")) is not None
                          and r.state == "complete" and r, timeout_s=240, what=f"{family}: 2 pages indexed")
        assert record.indexed_pages == [1, 2] and record.failed_pages == []
        assert record.embedding_dimension == dim
        index = store.index_model()
        assert index is not None and index.family == family and index.dim == dim and index.random_weights
        payloads = store.page_payloads("report")
        assert len(payloads) == 2 and all("random weights" in p["model"] for p in payloads)

    # The pipeline has let go of the embedded store: search it as `colstream search` does.
    results = search_store(settings, "what is on page 1", {}, top_k=5)
    assert [r["document_id"] for r in results] == ["report", "report"]
    assert sorted(r["page_number"] for r in results) == [1, 2]
    assert all(r["model"] == payloads[0]["model"] for r in results)
    assert results[0]["score"] >= results[1]["score"]
