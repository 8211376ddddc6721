"""The splitter handler with the converter wired in: Office uploads become page tasks, hostile ones
dead letters with their reason, and the next upload still splits (no broker: emitted records are
collected in a list)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from colstream.consumers.splitter.convert import OfficeConverter, soffice_available
from colstream.consumers.splitter.stage import SplitterHandler
from colstream.consumers.splitter.workers import StreamingRenderer
from colstream.embedding.profile import RenderTarget
from colstream.infra.blobstore import open_blob_store
from colstream.infra.kafka import OutRecord, RecordPosition
from colstream.infra.settings import ColstreamSettings
from colstream.infra.stage_runner import RawRecord
from tests.fixtures import office

pytestmark = pytest.mark.skipif(
    not soffice_available(ColstreamSettings().converter), reason="LibreOffice is not installed"
)


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


def test_without_a_converter_office_files_stay_unsupported(tmp_path: Path) -> None:
    topics = ColstreamSettings().topics
    emitted = _split(tmp_path, {"memo": office.make_docx(1)}, with_converter=False)
    dlq = _topic(topics.dlq, emitted)
    assert [(d["document_id"], d["error_type"]) for d in dlq] == [("memo", "UnsupportedFormat")]
    assert "Office" in dlq[0]["message"]
