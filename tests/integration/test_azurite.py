"""Blob store against a real Azure Storage API (the Azurite emulator).

The session fixture installs Azurite from npm on first use (about 35 s, cached
under the state dir) and reuses an emulator already answering on the port.
"""

from __future__ import annotations

import io
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from colstream.infra.azurite import AzuriteHandle
from colstream.infra.blobstore import AzureBlob, BlobError, BlobStore, resolve_blob_uri
from colstream.infra.settings import BlobSettings

pytestmark = pytest.mark.azurite


@pytest.fixture
def container() -> str:
    return f"it-{uuid.uuid4().hex[:12]}"


def _settings(azurite: AzuriteHandle, tmp_path: Path, **overrides: object) -> BlobSettings:
    values: dict[str, object] = {"local_root": tmp_path / "blobs", **azurite.blob_settings_overrides()}
    values.update(overrides)
    return BlobSettings.model_validate(values)


def _pdf_bytes(pages: int = 3) -> bytes:
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument.new()
    for _ in range(pages):
        document.new_page(595, 842)
    buffer = io.BytesIO()
    document.save(buffer)
    document.close()
    return buffer.getvalue()


def test_put_file_then_download_by_emulator_uri(
    azurite: AzuriteHandle, container: str, tmp_path: Path
) -> None:
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(_pdf_bytes())
    store = BlobStore(_settings(azurite, tmp_path, azure_upload_container=container))

    uri = store.put_file(pdf, "2026/Q1 report.pdf", content_type="application/pdf")

    assert uri == f"http://127.0.0.1:{azurite.port}/devstoreaccount1/{container}/2026/Q1%20report.pdf"
    location = resolve_blob_uri(uri, store.settings)
    assert isinstance(location, AzureBlob) and location.blob == "2026/Q1 report.pdf"
    with store.download(uri, max_bytes=pdf.stat().st_size) as local:
        assert local.read_bytes() == pdf.read_bytes()
        assert local.suffix == ".pdf"
        spooled = local
    assert not spooled.exists()

    # A reader that only knows the emulator endpoint (no upload container) reads it too.
    reader = BlobStore(_settings(azurite, tmp_path))
    assert reader.get_bytes(uri, max_bytes=10_000_000) == pdf.read_bytes()

    with pytest.raises(BlobError) as info, store.download(uri, max_bytes=100):
        pass
    assert info.value.error_type == "BlobTooLarge"

    store.delete(uri)
    store.delete(uri)
    with pytest.raises(BlobError) as info, store.download(uri, max_bytes=10_000_000):
        pass
    assert info.value.error_type == "BlobNotFound"


def test_streaming_in_small_chunks(azurite: AzuriteHandle, container: str, tmp_path: Path) -> None:
    store = BlobStore(_settings(azurite, tmp_path, azure_upload_container=container, chunk_bytes=64 * 1024))
    payload = os.urandom(1_000_000)
    uri = store.put_bytes("random.bin", payload)
    with store.download(uri, max_bytes=len(payload)) as local:
        assert local.read_bytes() == payload
    with pytest.raises(BlobError) as info, store.download(uri, max_bytes=len(payload) - 1):
        pass
    assert info.value.error_type == "BlobTooLarge"


def test_sas_token_auth(azurite: AzuriteHandle, container: str, tmp_path: Path) -> None:
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    writer = BlobStore(_settings(azurite, tmp_path, azure_upload_container=container))
    payload = _pdf_bytes(1)
    uri = writer.put_bytes("sas/doc.pdf", payload, content_type="application/pdf")

    def sas(permission: ContainerSasPermissions) -> str:
        return generate_container_sas(
            account_name=azurite.account_name,
            container_name=container,
            account_key=azurite.account_key,
            permission=permission,
            expiry=datetime.now(UTC) + timedelta(hours=1),
        )

    sas_settings = {
        "azure_auth": "sas",
        "azure_connection_string": None,
        "azure_endpoints": {azurite.account_name: azurite.blob_endpoint},
    }
    reader = BlobStore(
        _settings(azurite, tmp_path, **sas_settings, azure_sas_token=sas(ContainerSasPermissions(read=True)))
    )
    with reader.download(uri, max_bytes=len(payload)) as local:
        assert local.read_bytes() == payload

    write_only = BlobStore(
        _settings(azurite, tmp_path, **sas_settings, azure_sas_token=sas(ContainerSasPermissions(write=True)))
    )
    with pytest.raises(BlobError) as info, write_only.download(uri, max_bytes=len(payload)):
        pass
    assert info.value.error_type == "BlobUnavailable"
