"""Every file of the hostile corpus (PDFs, images, Office, HTML and text files)
through the real pipeline, with its exact outcome."""

from __future__ import annotations

import json

import pytest

from colstream.infra.settings import ColstreamSettings
from tests.convergence import REPORT_DIR, wait_drained
from tests.fixtures.corpus import DeadLettered, Indexed, build_corpus
from tests.fixtures.docs import make_pdf
from tests.harness import dead_letters, kcat_produce, pipeline_in_threads, upload_line, wait_for

pytestmark = pytest.mark.kafka

# Event-level cases: what a person can get wrong when typing an event by hand.
BAD_EVENTS = {
    "event-invalid-json": ("event-invalid-json|{\"document_id\": \"x\", blob_uri", "InvalidJSON"),
    "event-missing-id": ('event-missing-id|{"blob_uri": "file:///x.pdf"}', "InvalidEvent"),
    "event-schema-v9": (
        'event-schema-v9|{"document_id": "event-schema-v9", "blob_uri": "file:///x.pdf", "schema_version": 9}',
        "UnsupportedSchemaVersion",
    ),
    "event-key-mismatch": ('event-key-mismatch|{"document_id": "someone-else", "blob_uri": "file:///x.pdf"}',
                           "KeyMismatch"),
    "event-outside-root": ('event-outside-root|{"document_id": "event-outside-root", "blob_uri": "file:///etc/passwd"}',
                           "BlobNotAllowed"),
    "event-ssrf": ('event-ssrf|{"document_id": "event-ssrf", "blob_uri": "http://169.254.169.254/latest/meta-data"}',
                   "BlobNotAllowed"),
}


def test_every_corpus_file_ends_indexed_or_dead_lettered_with_its_reason(
    pipeline_settings: ColstreamSettings,
) -> None:
    settings = pipeline_settings.updated(limits={"render_timeout_s": 20.0}, converter={"timeout_s": 30.0})
    cases = build_corpus(settings.blob.local_root / "corpus")
    assert len(cases) >= 60
    lines = []
    for case in cases:
        extra = {"filename": case.filename}
        if case.content_type:
            extra["content_type"] = case.content_type
        lines.append(upload_line(f"corpus-{case.name}", case.data_path.resolve().as_uri(), **extra))
    lines += [line for line, _ in BAD_EVENTS.values()]
    good = settings.blob.local_root / "after.pdf"
    good.write_bytes(make_pdf(2))

    outcomes: dict[str, str] = {}
    with pipeline_in_threads(settings) as store:
        kcat_produce(settings, settings.topics.uploads, lines)
        # the next good document, published after all the bad ones, still indexes
        kcat_produce(settings, settings.topics.uploads, [upload_line("after-the-corpus", good.resolve().as_uri())])
        wait_for(lambda: store.count_pages("after-the-corpus") == 2, 600, what="good document after the corpus")
        wait_drained(settings, timeout_s=600)
        records = store.get_records([f"corpus-{c.name}" for c in cases])
        letters = dead_letters(settings)
        problems = []
        for case in cases:
            doc = f"corpus-{case.name}"
            record = records.get(doc)
            mine = [d for d in letters if d.get("document_id") == doc]
            pages = store.count_pages(doc)
            if isinstance(case.expected, Indexed):
                indexed = case.expected.pages - len(case.expected.failed_pages)
                observed = (record.state if record else None, record.total_pages if record else None,
                            pages, tuple(record.failed_pages) if record else None,
                            sorted({d["error_type"] for d in mine}))
                wanted = ("partial" if case.expected.failed_pages else "complete", case.expected.pages, indexed,
                          case.expected.failed_pages,
                          sorted(set((case.expected.page_error or "").split(", ")) - {""}))
                outcomes[case.name] = (f"indexed {indexed}/{case.expected.pages} pages"
                                       + (f", failed {list(case.expected.failed_pages)} "
                                          f"({case.expected.page_error})" if case.expected.failed_pages else ""))
            else:
                assert isinstance(case.expected, DeadLettered)
                observed = (record.state if record else None, pages, sorted({d["error_type"] for d in mine}))
                wanted = ("failed", 0, [case.expected.error_type])
                outcomes[case.name] = f"dead-lettered {case.expected.error_type}"
            if observed != wanted:
                problems.append(f"{case.name}: observed {observed}, expected {wanted}")
        for key, (_, error_type) in BAD_EVENTS.items():
            mine = [d for d in letters if d.get("original_key") == key]
            if [d["error_type"] for d in mine] != [error_type]:
                problems.append(f"{key}: dead letters {[d['error_type'] for d in mine]}, expected [{error_type}]")
            outcomes[key] = f"dead-lettered {error_type}"
        for letter in letters:  # every dead letter carries a reason a person can act on
            assert letter["message"] and letter["stage"] and letter["error_type"]
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    (REPORT_DIR / "corpus-outcomes.json").write_text(json.dumps(outcomes, indent=2))
    assert not problems, "\n".join(problems)
