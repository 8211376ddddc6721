"""The splitter handler: page tasks for a good upload (the offset is the version), a
DocumentDeleted for a tombstone, dead letters with reasons (and a DocumentFailed downstream)
for bad uploads, claim checks for pages too big for the topic, and commits through the real
runner on the in-memory broker; with the converter wired in, Office uploads become page tasks,
hostile ones dead letters with their reason, and the next upload still splits."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from PIL import Image

from colstream.consumers.splitter.convert import OfficeConverter, soffice_available
from colstream.consumers.splitter.stage import SplitterHandler
from colstream.consumers.splitter.workers import StreamingRenderer
from colstream.embedding.profile import RenderTarget
from colstream.infra.blobstore import open_blob_store
from colstream.infra.kafka import OutRecord, RecordPosition
from colstream.infra.settings import ColstreamSettings, LimitSettings
from colstream.infra.stage_runner import RawRecord, StageRunner
from colstream.schemas import DocumentDeleted, DocumentFailed, PageTask, decode_page_message
from colstream.testing import InMemoryBroker, ListEmit, RunningStage, wait_until
from tests.fixtures import docs, office

_soffice_missing = pytest.mark.skipif(
    not soffice_available(ColstreamSettings().converter), reason="LibreOffice is not installed"
)


def needs_soffice(test: Any) -> Any:
    """Conversions through the real LibreOffice take seconds each: they run in the full suite
    (``scripts/test.sh``, CI), not in the quick tier, and are skipped where soffice is missing."""
    return pytest.mark.slow(_soffice_missing(test))


def _record(document_id: str, blob: Path, offset: int, **extra: object) -> RawRecord:
    value = {"document_id": document_id, "blob_uri": blob.as_uri(), **extra}
    return RawRecord(key=document_id, value=json.dumps(value).encode(), position=RecordPosition("uploads", 0, offset))


def _split(tmp_path: Path, uploads: dict[str, bytes], *, with_converter: bool = True) -> list[OutRecord]:
    settings = ColstreamSettings().updated(state_dir=tmp_path, blob={"local_root": tmp_path / "blobs"})
    (tmp_path / "blobs").mkdir()
    converter = OfficeConverter(settings.converter.model_copy(update={"timeout_s": 60}), work_dir=tmp_path)
    handler = SplitterHandler(
        settings, open_blob_store(settings), StreamingRenderer(1, settings.limits),
        RenderTarget(max_pixels=200_000), converter=converter if with_converter else None,
    )
    emitted: list[OutRecord] = []
    try:
        for offset, (document_id, data) in enumerate(uploads.items()):
            blob = tmp_path / "blobs" / f"{document_id}.bin"
            blob.write_bytes(data)
            # The declared type and name are a PDF's: the content decides.
            handler.split(_record(document_id, blob, offset, filename="x.pdf", content_type="application/pdf"),
                          emitted.append)
    finally:
        handler.close()
        if not with_converter:
            converter.close()
    return emitted


def _topic(settings_topic: str, emitted: list[OutRecord]) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(r.value or b"") for r in emitted if r.topic == settings_topic]


@needs_soffice
def test_an_office_upload_becomes_page_tasks_and_a_hostile_one_a_dead_letter(tmp_path: Path) -> None:
    topics = ColstreamSettings().topics
    emitted = _split(tmp_path, {
        "memo": office.make_docx(3),
        "secret": office.make_encrypted_docx(tmp_path),
        "bomb": office.make_zip_bomb(),
        "deck": office.make_pptx(2),
    })
    pages = _topic(topics.pages, emitted)
    tasks = [(p["document"]["document_id"], p["page_number"], p["total_pages"]) for p in pages if p["type"] == "page"]
    assert tasks == [("memo", 1, 3), ("memo", 2, 3), ("memo", 3, 3), ("deck", 1, 2), ("deck", 2, 2)]
    assert all(p["image_format"] == "jpeg" and p["image_b64"] for p in pages if p["type"] == "page")
    dlq = [(d["document_id"], d["error_type"]) for d in _topic(topics.dlq, emitted)]
    assert dlq == [("secret", "EncryptedDocument"), ("bomb", "ArchiveTooLarge")]


@needs_soffice
def test_without_a_converter_office_files_stay_unsupported(tmp_path: Path) -> None:
    topics = ColstreamSettings().topics
    emitted = _split(tmp_path, {"memo": office.make_docx(1)}, with_converter=False)
    dlq = _topic(topics.dlq, emitted)
    assert [(d["document_id"], d["error_type"]) for d in dlq] == [("memo", "UnsupportedFormat")]
    assert "Office" in dlq[0]["message"]


TARGET = RenderTarget(max_pixels=64 * 64 * 4)
GROUP = "splitter-test"


@pytest.fixture(scope="module")
def renderer() -> Iterator[StreamingRenderer]:
    # One worker pool for the module: starting workers is the slow part.
    with StreamingRenderer(1, LimitSettings()) as pool:
        yield pool


@pytest.fixture
def settings(tmp_path: Path) -> ColstreamSettings:
    (tmp_path / "blobs").mkdir()
    return ColstreamSettings().updated(kafka={"bootstrap_servers": "in-memory"}, state_dir=tmp_path,
                                       blob={"local_root": tmp_path / "blobs"}, shutdown={"grace_s": 2.0})


class KeepRenderer:
    """The module's pool, left open when a handler closes."""

    def __init__(self, pool: StreamingRenderer) -> None:
        self.pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    def close(self) -> None:
        pass


def make_handler(settings: ColstreamSettings, renderer: StreamingRenderer) -> SplitterHandler:
    return SplitterHandler(settings, open_blob_store(settings), cast(StreamingRenderer, KeepRenderer(renderer)), TARGET)


@pytest.fixture
def handler(settings: ColstreamSettings, renderer: StreamingRenderer) -> Iterator[SplitterHandler]:
    splitter = make_handler(settings, renderer)
    yield splitter
    splitter.close()


def blob(settings: ColstreamSettings, name: str, data: bytes) -> str:
    path = settings.blob.local_root / name
    path.write_bytes(data)
    return path.as_uri()


def upload(key: str | None, value: dict[str, Any] | bytes | None, offset: int) -> RawRecord:
    raw = json.dumps(value).encode() if isinstance(value, dict) else value
    return RawRecord(key=key, value=raw, position=RecordPosition("documents.uploads", 0, offset))


def split(handler: SplitterHandler, record: RawRecord) -> ListEmit:
    emit = ListEmit()
    assert handler.submit([record], emit).result(timeout=60) == []  # pages go out as they render
    return emit


def test_a_pdf_upload_becomes_one_page_task_per_page_versioned_by_its_offset(
    handler: SplitterHandler, settings: ColstreamSettings
) -> None:
    uri = blob(settings, "report.pdf", docs.make_pdf(3))
    emit = split(handler, upload("rep-1", {"document_id": "rep-1", "blob_uri": uri, "filename": "Report.pdf",
                                           "metadata": {"year": 2026}}, 41))
    assert emit.to(settings.topics.dlq) == []
    tasks = [decode_page_message(r.value) for r in emit.to(settings.topics.pages)]
    assert all(isinstance(t, PageTask) for t in tasks) and {r.key for r in emit} == {"rep-1"}
    assert [(t.page_number, t.total_pages) for t in tasks if isinstance(t, PageTask)] == [(1, 3), (2, 3), (3, 3)]
    first = tasks[0]
    assert isinstance(first, PageTask)
    assert (first.document.document_id, first.document.version, first.document.filename) == ("rep-1", 41, "Report.pdf")
    assert first.document.blob_uri == uri and first.document.metadata == {"year": 2026}
    assert first.image_ref is None and first.image_b64 is not None
    image = Image.open(io.BytesIO(base64.b64decode(first.image_b64)))
    assert image.size == (first.width, first.height)
    # Rendered at the size the model consumes.
    assert TARGET.max_pixels is not None and first.width * first.height <= TARGET.max_pixels


def test_an_image_upload_is_one_page(handler: SplitterHandler, settings: ColstreamSettings) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, format="PNG")
    uri = blob(settings, "scan.png", buffer.getvalue())
    emit = split(handler, upload("scan", {"document_id": "scan", "blob_uri": uri}, 3))
    [only] = [decode_page_message(r.value) for r in emit.to(settings.topics.pages)]
    assert isinstance(only, PageTask) and (only.page_number, only.total_pages) == (1, 1)


def test_a_tombstone_becomes_a_document_deleted_at_its_offset(
    handler: SplitterHandler, settings: ColstreamSettings
) -> None:
    emit = split(handler, upload("rep-1", None, 57))
    [out] = list(emit)
    assert (out.topic, out.key) == (settings.topics.pages, "rep-1")
    deleted = decode_page_message(out.value)
    assert isinstance(deleted, DocumentDeleted) and deleted.document.version == 57


@pytest.mark.parametrize(
    ("key", "value", "error_type"),
    [
        ("d", b"not json", "InvalidJSON"),
        ("d", {"document_id": "d"}, "InvalidEvent"),
        ("other", {"document_id": "d", "blob_uri": "file:///x.pdf"}, "KeyMismatch"),
        (None, None, "MissingKey"),
    ],
)
def test_an_invalid_upload_is_dead_lettered_with_its_reason_and_nothing_downstream(
    handler: SplitterHandler, settings: ColstreamSettings, key: str | None, value: Any, error_type: str
) -> None:
    emit = split(handler, upload(key, value, 12))
    assert emit.to(settings.topics.pages) == []
    [letter] = [json.loads(r.value or b"") for r in emit.to(settings.topics.dlq)]
    assert (letter["stage"], letter["error_type"], letter["source_offset"]) == ("splitter", error_type, 12)
    assert letter["message"]
    if isinstance(value, bytes):
        assert letter["original_value"] == value.decode()  # the original travels with it, for a redrive


def failed_document(emit: ListEmit, settings: ColstreamSettings) -> tuple[dict[str, Any], DocumentFailed]:
    [letter] = [json.loads(r.value or b"") for r in emit.to(settings.topics.dlq)]
    [failed] = [decode_page_message(r.value) for r in emit.to(settings.topics.pages)]
    assert isinstance(failed, DocumentFailed)
    assert (letter["document_id"], letter["version"]) == (failed.document.document_id, failed.document.version)
    assert letter["error_type"] == failed.error_type and failed.stage == "splitter"
    return letter, failed


def test_a_missing_blob_fails_the_document_downstream_too(
    handler: SplitterHandler, settings: ColstreamSettings
) -> None:
    uri = (settings.blob.local_root / "never-uploaded.pdf").as_uri()
    letter, failed = failed_document(split(handler, upload("d", {"document_id": "d", "blob_uri": uri}, 8)), settings)
    assert letter["error_type"].startswith("Blob") and failed.document.version == 8


def test_a_blob_outside_the_blob_root_is_refused(handler: SplitterHandler, settings: ColstreamSettings,
                                                 tmp_path: Path) -> None:
    outside = tmp_path / "outside.pdf"
    outside.write_bytes(docs.make_pdf(1))
    letter, _ = failed_document(
        split(handler, upload("d", {"document_id": "d", "blob_uri": outside.as_uri()}, 2)), settings)
    assert letter["error_type"].startswith("Blob")


@pytest.mark.parametrize(("data", "error_type"), [(b"plain bytes, no format at all \x00\x01", "UnsupportedFormat"),
                                                  (b"%PDF-1.7\n garbage", "BrokenDocument")])
def test_a_file_that_is_not_a_renderable_document_fails_the_document(
    handler: SplitterHandler, settings: ColstreamSettings, data: bytes, error_type: str
) -> None:
    uri = blob(settings, "thing.bin", data)
    letter, _ = failed_document(split(handler, upload("d", {"document_id": "d", "blob_uri": uri}, 4)), settings)
    assert letter["error_type"] == error_type and letter["message"]


def test_a_page_too_big_for_the_topic_travels_as_a_claim_check(
    settings: ColstreamSettings, renderer: StreamingRenderer
) -> None:
    small_topic = settings.updated(topics={"pages_max_message_bytes": 16_384 + 64})
    handler = make_handler(small_topic, renderer)
    try:
        uri = blob(small_topic, "big.pdf", docs.make_pdf(1))
        emit = split(handler, upload("big", {"document_id": "big", "blob_uri": uri}, 6))
    finally:
        handler.close()
    [page] = [decode_page_message(r.value) for r in emit.to(small_topic.topics.pages)]
    assert isinstance(page, PageTask) and page.image_b64 is None and page.image_ref is not None
    stored = open_blob_store(small_topic).get_bytes(page.image_ref, 10_000_000)
    assert Image.open(io.BytesIO(stored)).size == (page.width, page.height)
    # Named by document, version and page, so a replay overwrites the same claim.
    assert "/claims/big-" in page.image_ref and "/v6/page-1." in page.image_ref


def test_the_runner_publishes_pages_in_partition_order_and_commits(
    settings: ColstreamSettings, renderer: StreamingRenderer
) -> None:
    broker = InMemoryBroker()
    uploads = settings.topics.uploads
    first = blob(settings, "a.pdf", docs.make_pdf(2))
    broker.append(uploads, "a", json.dumps({"document_id": "a", "blob_uri": first}))
    broker.append(uploads, "bad", b"{")
    broker.append(uploads, "a", None)
    runner = StageRunner(settings, make_handler(settings, renderer), topics=[uploads], group_id=GROUP,
                         batch_size=1, batch_timeout_ms=10, consumer_factory=broker.consumer,
                         producer_factory=broker.producer)
    with RunningStage(runner) as running:
        wait_until(lambda: broker.committed_offset(GROUP, uploads) == 3, timeout=60, what="commit")
        running.stop()
        assert running.error is None
    pages = [decode_page_message(v) for v in broker.values(settings.topics.pages)]
    assert [(type(m).__name__, m.document.version) for m in pages] == [
        ("PageTask", 0), ("PageTask", 0), ("DocumentDeleted", 2)]
    [letter] = [json.loads(v or b"") for v in broker.values(settings.topics.dlq)]
    assert (letter["error_type"], letter["source_offset"]) == ("InvalidJSON", 1)


def test_an_output_emitted_for_a_page_counts_towards_the_commit(
    settings: ColstreamSettings, renderer: StreamingRenderer
) -> None:
    """Pages are emitted while the document renders (not returned at the end): the batch
    is committed only once every emitted page is acknowledged."""
    broker = InMemoryBroker()
    broker.hold_acks = True
    uploads = settings.topics.uploads
    broker.append(uploads, "a", json.dumps({"document_id": "a", "blob_uri": blob(settings, "a.pdf", docs.make_pdf(2))}))
    runner = StageRunner(settings, make_handler(settings, renderer), topics=[uploads], group_id=GROUP,
                         batch_size=1, batch_timeout_ms=10, consumer_factory=broker.consumer,
                         producer_factory=broker.producer)
    with RunningStage(runner) as running:
        wait_until(lambda: runner.stats.records_out == 2, timeout=60, what="pages emitted")
        time.sleep(0.2)
        assert broker.committed_offset(GROUP, uploads) is None and broker.values(settings.topics.pages) == []
        broker.hold_acks = False
        wait_until(lambda: broker.committed_offset(GROUP, uploads) == 1, what="commit after acks")
        running.stop()
    assert len(broker.values(settings.topics.pages)) == 2

