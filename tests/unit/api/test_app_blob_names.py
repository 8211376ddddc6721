"""Every id the contract accepts can be stored, and no error names a server path."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colstream.infra.blob_names import document_blob_dir, upload_blob_name
from colstream.infra.blobstore import BlobStore
from colstream.infra.settings import BlobSettings
from colstream.schemas.ids import DOCUMENT_ID_MAX_LENGTH, DOCUMENT_ID_PATTERN, is_valid_document_id
from tests.unit.api.test_app import PDF_BYTES, Api, api, blob_path, record

__all__ = ["api"]

LONG_IDS = [
    "a" * DOCUMENT_ID_MAX_LENGTH,
    "/".join(["s" * 50] * 5) + "/a",  # 256 characters in six segments
    ("x." * 128)[:255] + "y",
]


def upload(api: Api, document_id: str) -> tuple[int, str]:
    response = api.client.post(
        "/ingest/pdf",
        params={"wait": False},
        data={"document_id": document_id},
        files={"file": ("report.pdf", PDF_BYTES, "application/pdf")},
    )
    return response.status_code, response.text


def test_a_256_character_id_is_stored_and_published(api: Api) -> None:
    for document_id in LONG_IDS:
        assert len(document_id) == DOCUMENT_ID_MAX_LENGTH and is_valid_document_id(document_id)
        status, text = upload(api, document_id)
        assert status == 202, text
        event = api.publisher.uploads[-1]
        assert event.document_id == document_id
        stored = blob_path(event.blob_uri)
        assert stored.read_bytes() == PDF_BYTES
        assert all(len(part.encode()) <= 255 for part in stored.parts)


def test_versions_of_one_document_share_a_directory_and_ids_never_do() -> None:
    assert document_blob_dir("a/b") != document_blob_dir("a_b") != document_blob_dir("a:b")
    first, second = upload_blob_name("doc", "x.pdf"), upload_blob_name("doc", "x.pdf")
    assert first != second and first.rsplit("/", 2)[0] == second.rsplit("/", 2)[0] == document_blob_dir("doc")


@pytest.mark.slow  # 150 generated ids, each stored and deleted on disk
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.from_regex(DOCUMENT_ID_PATTERN, fullmatch=True).filter(is_valid_document_id), st.text(max_size=300))
def test_the_store_holds_every_id_the_contract_accepts(document_id: str, file_name: str) -> None:
    name = upload_blob_name(document_id, file_name)
    assert len(name) <= 400 and all(0 < len(part.encode()) <= 255 and part not in (".", "..")
                                    for part in name.split("/"))
    with tempfile.TemporaryDirectory() as root:
        store = BlobStore(BlobSettings(local_root=Path(root)))
        uri = store.put_bytes(name, b"%PDF-1.4")
        store.delete(uri)


def test_no_error_response_names_a_server_path(api: Api, tmp_path: Path) -> None:
    # The blob root is a file: every write fails with an OSError that names the path.
    root = Path(api.settings.blob.local_root)
    root.parent.mkdir(parents=True, exist_ok=True)
    root.write_text("not a directory")
    status, text = upload(api, "doc-1")
    assert status == 503, text
    assert str(tmp_path) not in text and "/blobs" not in text
    api.store.fail = OSError(2, "No such file or directory", str(tmp_path / "qdrant" / "collection"))
    for path in ("/documents", "/documents/doc-1", "/stats"):
        response = api.client.get(path)
        assert response.status_code == 503
        assert str(tmp_path) not in response.text, path
    api.store.fail = None
    api.store.put(record("doc-2", 1, "complete"))
    api.publisher.fail = RuntimeError(f"queue spooled at {tmp_path}/spool is full")
    root.unlink()
    status, text = upload(api, "doc-2")
    assert status == 503 and str(tmp_path) not in text, text


def test_documents_never_show_a_server_path(api: Api, tmp_path: Path) -> None:
    status, _ = upload(api, "shown")
    assert status == 202
    stored = api.publisher.uploads[-1].blob_uri
    assert stored.startswith("file://")
    api.store.put(record("shown", 10, "failed", blob_uri=stored,
                         error=f"BlobNotFound: no file at {blob_path(stored)}; was it deleted after the upload event?"))
    body = api.client.get("/documents/shown")
    assert body.status_code == 200
    assert str(tmp_path) not in body.text
    assert body.json()["blob_uri"].startswith("local:uploads/") and "BlobNotFound" in body.json()["error"]
