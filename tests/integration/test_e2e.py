"""One upload end to end, against the real broker: kcat in, Qdrant pages out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from colstream.infra.settings import ColstreamSettings
from tests.fixtures.docs import make_encrypted_pdf, make_image, make_pdf
from tests.harness import dead_letters, kcat_produce, pipeline_in_threads, read_all, upload_line, wait_for

pytestmark = pytest.mark.kafka


def _store_blob(settings: ColstreamSettings, name: str, data: bytes) -> str:
    path = settings.blob.local_root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path.resolve().as_uri()


def _pages(store, document_id: str) -> list[dict]:  # type: ignore[no-untyped-def]
    return sorted(store.page_payloads(document_id), key=lambda p: p["page_number"])


def test_pdf_and_image_are_indexed_then_a_tombstone_removes_them(pipeline_settings: ColstreamSettings) -> None:
    settings = pipeline_settings
    pdf_uri = _store_blob(settings, "report.pdf", make_pdf(3))
    png_uri = _store_blob(settings, "scan.png", make_image("PNG", (640, 480)))
    with pipeline_in_threads(settings) as store:
        kcat_produce(settings, settings.topics.uploads, [
            upload_line("report", pdf_uri, filename="report.pdf", metadata={"tenant": "acme"}),
            upload_line("scan", png_uri),
        ])
        wait_for(lambda: len(store.page_payloads("report")) == 3 and len(store.page_payloads("scan")) == 1,
                 timeout_s=120, what="4 pages in Qdrant")
        report = _pages(store, "report")
        assert [p["page_number"] for p in report] == [1, 2, 3]
        for page in report:
            assert page["document_id"] == "report"
            assert page["total_pages"] == 3
            assert page["filename"] == "report.pdf"
            assert page["blob_uri"] == pdf_uri
            assert "random weights" in page["model"]
        scan = _pages(store, "scan")
        assert scan[0]["filename"] == "scan.png" and scan[0]["total_pages"] == 1
        assert store.count_pages() == 4

        records = wait_for(lambda: (r := store.get_records(["report", "scan"])) and
                           all(x.state == "complete" for x in r.values()) and r, 60, what="records complete")
        assert records["report"].total_pages == 3 and records["report"].indexed_pages == [1, 2, 3]
        assert records["report"].embedding_dimension == 128

        # Upstream systems can wait for completion on documents.indexed.
        done = wait_for(lambda: {k for k, v in read_all(settings, settings.topics.indexed) if v and
                                 json.loads(v)["state"] == "complete"} >= {"report", "scan"}, 30,
                        what="completion events")
        assert done

        # A tombstone (same key, empty value with -Z) removes every page of the document.
        kcat_produce(settings, settings.topics.uploads, ["report|"])
        wait_for(lambda: store.count_pages("report") == 0, 60, what="report deleted")
        assert store.count_pages("scan") == 1
        assert wait_for(lambda: store.get_records(["report"])["report"].state == "deleted", 30)


def test_bad_inputs_are_dead_lettered_and_the_next_document_still_indexes(
    pipeline_settings: ColstreamSettings,
) -> None:
    settings = pipeline_settings
    locked = _store_blob(settings, "locked.pdf", make_encrypted_pdf(2, user_password="secret"))
    good = _store_blob(settings, "good.pdf", make_pdf(2))
    with pipeline_in_threads(settings) as store:
        kcat_produce(settings, settings.topics.uploads, [
            upload_line("locked", locked),
            "broken|{not json",
            upload_line("missing", (settings.blob.local_root / "nope.pdf").resolve().as_uri()),
            'future|{"document_id": "future", "blob_uri": "file:///x.pdf", "schema_version": 99}',
            upload_line("good", good),
        ])
        wait_for(lambda: store.count_pages("good") == 2, 120, what="good document indexed")
        letters = wait_for(lambda: (d := dead_letters(settings)) and len(d) >= 4 and d, 30, what="4 dead letters")
        by_key = {d["original_key"]: d for d in letters}
        assert by_key["locked"]["error_type"] == "EncryptedDocument"
        assert "password" in by_key["locked"]["message"].lower()
        assert by_key["broken"]["error_type"] == "InvalidJSON"
        assert by_key["broken"]["original_value"] == "{not json"
        assert by_key["missing"]["error_type"] == "BlobNotFound"
        assert by_key["future"]["error_type"] == "UnsupportedSchemaVersion"
        for letter in letters:
            assert letter["stage"] == "splitter"
            assert letter["source_topic"] == settings.topics.uploads
        # The failed version is recorded too, so no stale pages could linger for it.
        assert store.get_records(["locked"])["locked"].state == "failed"
        assert store.count_pages("locked") == 0


def test_reupload_with_fewer_pages_leaves_exactly_the_new_pages(pipeline_settings: ColstreamSettings) -> None:
    settings = pipeline_settings
    ten = _store_blob(settings, "ten.pdf", make_pdf(10))
    three = _store_blob(settings, "three.pdf", make_pdf(3))
    with pipeline_in_threads(settings) as store:
        kcat_produce(settings, settings.topics.uploads, [upload_line("doc", ten)])
        wait_for(lambda: store.count_pages("doc") == 10, 120, what="10 pages")
        kcat_produce(settings, settings.topics.uploads, [upload_line("doc", three)])
        wait_for(lambda: (r := store.get_records(["doc"]).get("doc")) is not None and r.total_pages == 3
                 and r.state == "complete", 120, what="3-page version complete")
        pages = _pages(store, "doc")
        assert [p["page_number"] for p in pages] == [1, 2, 3]
        assert {p["blob_uri"] for p in pages} == {three}
        assert len({p["version"] for p in pages}) == 1


def test_documents_command_reads_the_record_store(pipeline_settings: ColstreamSettings, tmp_path: Path) -> None:
    from colstream.cli.main import document_row

    settings = pipeline_settings
    uri = _store_blob(settings, "a.pdf", make_pdf(2))
    with pipeline_in_threads(settings) as store:
        kcat_produce(settings, settings.topics.uploads, [upload_line("a", uri, filename="a.pdf")])
        wait_for(lambda: (r := store.get_records(["a"]).get("a")) is not None and r.state == "complete", 120)
        rows = [document_row(r) for r in store.list_records()]
    assert rows == [{"document_id": "a", "filename": "a.pdf", "total_pages": 2, "embedding_dimension": 128,
                     "state": "complete", "version": rows[0]["version"], "indexed_pages": 2, "failed_pages": []}]


def test_colpali_family_end_to_end(kafka_bootstrap: str, tiny_colpali: Path, tmp_path: Path) -> None:
    """The model is chosen by settings: the same pipeline with a (tiny, random-weight) ColPali."""
    from colstream.infra.kafka import ensure_topics
    from tests.conftest import make_settings

    settings = make_settings(tmp_path, kafka_bootstrap, tiny_colpali).updated(model={"family": "colpali"})
    ensure_topics(settings)
    uri = _store_blob(settings, "deck.pdf", make_pdf(2, size=(960, 540)))
    with pipeline_in_threads(settings) as store:
        kcat_produce(settings, settings.topics.uploads, [upload_line("deck", uri)])
        wait_for(lambda: store.count_pages("deck") == 2, 120, what="colpali pages")
        record = wait_for(lambda: (r := store.get_records(["deck"]).get("deck")) and r.state == "complete" and r,
                          30, what="deck complete")
        assert record.embedding_dimension == 128
        assert "random weights" in (record.model or "")
    pages = read_all(settings, settings.topics.pages)
    task = json.loads(pages[0][1] or b"{}")
    # rendered for ColPali's square input (224 px for the tiny checkpoint): shorter side at the model's size
    assert min(task["width"], task["height"]) == 224
