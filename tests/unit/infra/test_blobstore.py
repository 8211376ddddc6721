"""Blob store: the allowlist gate, local round trips and bounded downloads."""

from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path

import pytest

from colstream.infra.blobstore import (
    AzureBlob,
    BlobError,
    BlobStore,
    LocalBlob,
    open_blob_store,
    resolve_blob_uri,
)
from colstream.infra.settings import BlobSettings, ColstreamSettings

AZURITE_ENDPOINT = "http://127.0.0.1:10000/devstoreaccount1"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "blobs"
    path.mkdir()
    return path


@pytest.fixture
def settings(root: Path) -> BlobSettings:
    return BlobSettings(
        local_root=root,
        azure_accounts=["goodacct"],
        azure_containers=["docs"],
        azure_endpoints={"devstoreaccount1": AZURITE_ENDPOINT},
    )


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, ...]]:
    """Any attempt to open a socket is recorded and fails the call."""
    attempts: list[tuple[object, ...]] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise AssertionError("the blob gate opened a network connection")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


# ----------------------------------------------------------------- allowlist


def test_allowlisted_azure_url_resolves(settings: BlobSettings) -> None:
    location = resolve_blob_uri("https://goodacct.blob.core.windows.net/docs/reports/Q1%202026.pdf", settings)
    assert isinstance(location, AzureBlob)
    assert (location.account, location.container, location.blob) == (
        "goodacct",
        "docs",
        "reports/Q1 2026.pdf",
    )
    assert location.endpoint == "https://goodacct.blob.core.windows.net"


def test_empty_container_list_allows_any_container_of_allowed_account(root: Path) -> None:
    open_settings = BlobSettings(local_root=root, azure_accounts=["goodacct"])
    location = resolve_blob_uri("https://goodacct.blob.core.windows.net/anything/x.pdf", open_settings)
    assert isinstance(location, AzureBlob) and location.container == "anything"


def test_emulator_url_resolves_only_through_configured_endpoint(settings: BlobSettings, root: Path) -> None:
    uri = f"{AZURITE_ENDPOINT}/docs/a.pdf"
    location = resolve_blob_uri(uri, settings)
    assert isinstance(location, AzureBlob)
    assert (location.account, location.endpoint, location.container) == (
        "devstoreaccount1",
        AZURITE_ENDPOINT,
        "docs",
    )
    without_endpoint = BlobSettings(local_root=root, azure_accounts=["devstoreaccount1"])
    with pytest.raises(BlobError) as info:
        resolve_blob_uri(uri, without_endpoint)
    assert info.value.error_type == "BlobNotAllowed"


def test_connection_string_endpoint_counts_as_configured(root: Path) -> None:
    from colstream.infra.azurite import azurite_connection_string

    settings = BlobSettings(local_root=root, azure_connection_string=azurite_connection_string(10000))
    location = resolve_blob_uri(f"{AZURITE_ENDPOINT}/anything/a.pdf", settings)
    assert isinstance(location, AzureBlob) and location.account == "devstoreaccount1"


@pytest.mark.parametrize(
    "uri",
    [
        "https://evilacct.blob.core.windows.net/docs/a.pdf",  # account not allowlisted
        "https://goodacct.blob.core.windows.net/secret/a.pdf",  # container not allowlisted
        "https://goodacct.blob.core.windows.net@evil.com/docs/a.pdf",  # userinfo trick
        "https://user:pw@goodacct.blob.core.windows.net/docs/a.pdf",
        "https://goodacct.blob.core.windows.net.evil.com/docs/a.pdf",
        "https://goodacct.blob.core.windows.net./docs/a.pdf",
        "https://goodacct.blob.core.windows.net:8443/docs/a.pdf",
        "http://goodacct.blob.core.windows.net/docs/a.pdf",  # plain http to the real service
        "https://goodacct.blob.core.windows.net/docs/a.pdf?sv=2020&sig=abc",
        "https://goodacct.blob.core.windows.net/docs/../secret/a.pdf",
        "https://goodacct.blob.core.windows.net/docs/%2e%2e/secret/a.pdf",
        "https://goodacct.blob.core.windows.net/docs/",
        "http://169.254.169.254/metadata/instance?api-version=2021-02-01",
        "http://169.254.169.254/devstoreaccount1/docs/a.pdf",
        "https://10.0.0.1/docs/a.pdf",
        "https://[::1]/docs/a.pdf",
        "http://127.0.0.1:10001/devstoreaccount1/docs/a.pdf",  # right host, wrong port
        "http://localhost:10000/devstoreaccount1/docs/a.pdf",  # endpoint names 127.0.0.1
        "http://127.0.0.1:10000/otheraccount/docs/a.pdf",
        "ftp://goodacct.blob.core.windows.net/docs/a.pdf",
        "gopher://127.0.0.1:10000/_x",
        "file:///etc/passwd",
        "file://evil.com/share/a.pdf",
        "https://goodacct.blob.core.windows.net/docs/a b.pdf",
        "",
        "https://goodacct.blob.core.windows.net/docs\\..\\a.pdf",
    ],
)
def test_refused_uris_never_touch_the_network(
    uri: str, settings: BlobSettings, no_network: list[tuple[object, ...]]
) -> None:
    store = BlobStore(settings)
    with pytest.raises(BlobError) as info, store.download(uri, max_bytes=1_000_000):
        pass
    assert info.value.error_type == "BlobNotAllowed"
    assert no_network == []


def test_dotdot_out_of_root_is_refused(settings: BlobSettings, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.pdf"
    outside.write_bytes(b"%PDF-secret")
    with pytest.raises(BlobError) as info:
        resolve_blob_uri(f"file://{root}/../outside.pdf", settings)
    assert info.value.error_type == "BlobNotAllowed"
    with pytest.raises(BlobError):
        resolve_blob_uri(f"file://{root}/%2e%2e/outside.pdf", settings)


def test_dotdot_that_stays_inside_root_is_fine(settings: BlobSettings, root: Path) -> None:
    (root / "sub").mkdir()
    (root / "a.pdf").write_bytes(b"x")
    location = resolve_blob_uri(f"file://{root}/sub/../a.pdf", settings)
    assert isinstance(location, LocalBlob) and location.path == (root / "a.pdf").resolve()


def test_symlink_escaping_root_is_refused(settings: BlobSettings, root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    (root / "innocent.pdf").symlink_to(secret)
    (root / "dirlink").symlink_to(tmp_path)
    store = BlobStore(settings)
    for uri in (f"file://{root}/innocent.pdf", f"file://{root}/dirlink/secret.txt"):
        with pytest.raises(BlobError) as info, store.download(uri, max_bytes=1000):
            pass
        assert info.value.error_type == "BlobNotAllowed"


def test_symlink_inside_root_is_followed(settings: BlobSettings, root: Path) -> None:
    (root / "real.pdf").write_bytes(b"%PDF-1.7 real")
    (root / "alias.pdf").symlink_to(root / "real.pdf")
    with BlobStore(settings).download(f"file://{root}/alias.pdf", max_bytes=100) as path:
        assert path.read_bytes() == b"%PDF-1.7 real"


def test_root_itself_and_directories_are_not_blobs(settings: BlobSettings, root: Path) -> None:
    (root / "folder").mkdir()
    store = BlobStore(settings)
    for uri in (f"file://{root}", f"file://{root}/folder"):
        with pytest.raises(BlobError) as info, store.download(uri, max_bytes=100):
            pass
        assert info.value.error_type == "BlobNotAllowed"


# ----------------------------------------------------------------- local store


def test_put_bytes_download_roundtrip(settings: BlobSettings, root: Path) -> None:
    store = BlobStore(settings)
    payload = os.urandom(50_000)
    uri = store.put_bytes("tenant/a.pdf", payload, content_type="application/pdf")
    assert uri.startswith("file://")
    assert (root / "tenant" / "a.pdf").read_bytes() == payload
    with store.download(uri, max_bytes=len(payload)) as path:
        assert path.read_bytes() == payload
    assert store.get_bytes(uri, max_bytes=len(payload)) == payload
    store.delete(uri)
    store.delete(uri)  # already gone: still fine
    with pytest.raises(BlobError) as info, store.download(uri, max_bytes=len(payload)):
        pass
    assert info.value.error_type == "BlobNotFound"


def test_put_file_copies_into_root(settings: BlobSettings, root: Path, tmp_path: Path) -> None:
    source = tmp_path / "upload.pdf"
    source.write_bytes(b"%PDF-1.7 " + os.urandom(10_000))
    uri = BlobStore(settings).put_file(source, "incoming/upload.pdf")
    assert isinstance(resolve_blob_uri(uri, settings), LocalBlob)
    assert (root / "incoming" / "upload.pdf").read_bytes() == source.read_bytes()
    assert not [p for p in (root / "incoming").iterdir() if p.name.startswith(".incoming-")]


@pytest.mark.parametrize("name", ["../escape.pdf", "/abs.pdf", "a/../../b.pdf", "a//b.pdf", "", "a\\b.pdf"])
def test_put_refuses_names_that_escape(settings: BlobSettings, name: str) -> None:
    with pytest.raises(BlobError) as info:
        BlobStore(settings).put_bytes(name, b"x")
    assert info.value.error_type == "BlobNotAllowed"


def test_max_bytes_enforced_for_local_files(settings: BlobSettings, root: Path) -> None:
    store = BlobStore(settings)
    uri = store.put_bytes("big.pdf", b"x" * 1001)
    with pytest.raises(BlobError) as info, store.download(uri, max_bytes=1000):
        pass
    assert info.value.error_type == "BlobTooLarge"
    with pytest.raises(BlobError) as info:
        store.get_bytes(uri, max_bytes=1000)
    assert info.value.error_type == "BlobTooLarge"
    with store.download(uri, max_bytes=1001) as path:
        assert path.stat().st_size == 1001


# ----------------------------------------------------------------- azure streaming (fake client)


class _FakeDownloader:
    def __init__(self, chunks: list[bytes], size: int | None) -> None:
        self._chunks = chunks
        self.size = size
        self.served = 0

    def chunks(self):  # type: ignore[no-untyped-def]
        for chunk in self._chunks:
            self.served += 1
            yield chunk


class _FakeBlobClient:
    def __init__(self, downloader: _FakeDownloader) -> None:
        self.downloader = downloader

    def download_blob(self) -> _FakeDownloader:
        return self.downloader


def _store_with_fake_blob(
    settings: BlobSettings, monkeypatch: pytest.MonkeyPatch, chunks: list[bytes], size: int | None
) -> tuple[BlobStore, _FakeDownloader]:
    store = BlobStore(settings)
    downloader = _FakeDownloader(chunks, size)
    monkeypatch.setattr(store, "_blob_client", lambda location: _FakeBlobClient(downloader))
    return store, downloader


def test_azure_download_streams_to_temp_file_and_cleans_up(
    settings: BlobSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = [os.urandom(1000) for _ in range(5)]
    store, _ = _store_with_fake_blob(settings, monkeypatch, chunks, size=5000)
    with store.download("https://goodacct.blob.core.windows.net/docs/a.pdf", max_bytes=5000) as path:
        assert path.suffix == ".pdf"
        assert path.read_bytes() == b"".join(chunks)
        kept = path
    assert not kept.exists()


def test_azure_download_stops_at_declared_size(
    settings: BlobSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, downloader = _store_with_fake_blob(settings, monkeypatch, [b"x" * 1000] * 5, size=5000)
    with (
        pytest.raises(BlobError) as info,
        store.download("https://goodacct.blob.core.windows.net/docs/a.pdf", max_bytes=4999),
    ):
        pass
    assert info.value.error_type == "BlobTooLarge"
    assert downloader.served == 0


def test_azure_download_aborts_when_stream_exceeds_limit(
    settings: BlobSettings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The size header says small, the stream keeps going: stop as soon as we pass the limit.
    spool = tmp_path / "spool"
    bounded = settings.model_copy(update={"download_dir": spool})
    store, downloader = _store_with_fake_blob(bounded, monkeypatch, [b"x" * 1000] * 50, size=10)
    with (
        pytest.raises(BlobError) as info,
        store.download("https://goodacct.blob.core.windows.net/docs/a.pdf", max_bytes=2500),
    ):
        pass
    assert info.value.error_type == "BlobTooLarge"
    assert downloader.served == 3
    assert list(spool.iterdir()) == []  # temp file removed even on failure


def test_blob_error_survives_pickling() -> None:
    error = BlobError("BlobTooLarge", "too big", "file:///x")
    clone = pickle.loads(pickle.dumps(error))
    assert (clone.error_type, clone.message, clone.uri) == ("BlobTooLarge", "too big", "file:///x")


def test_open_blob_store_uses_settings(root: Path) -> None:
    settings = ColstreamSettings(blob=BlobSettings(local_root=root))
    store = open_blob_store(settings)
    assert store.settings.local_root == root
    assert store.put_bytes("x.bin", b"1").startswith("file://")


def test_upload_account_is_readable_only_in_its_own_containers(root: Path) -> None:
    settings = BlobSettings(local_root=root, azure_upload_container="uploads", azure_upload_account="mystore")
    ok = resolve_blob_uri("https://mystore.blob.core.windows.net/uploads/a.pdf", settings)
    assert isinstance(ok, AzureBlob) and ok.container == "uploads"
    claims = resolve_blob_uri("https://mystore.blob.core.windows.net/colstream-claims/p1.jpg", settings)
    assert isinstance(claims, AzureBlob)
    with pytest.raises(BlobError) as info:
        resolve_blob_uri("https://mystore.blob.core.windows.net/private/a.pdf", settings)
    assert info.value.error_type == "BlobNotAllowed"


def test_put_returns_azure_uri_when_upload_container_set(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = BlobSettings(local_root=root, azure_upload_container="uploads", azure_upload_account="mystore")
    store = BlobStore(settings)
    uploaded: list[tuple[str, str, bytes]] = []

    class _Client:
        def __init__(self, location: AzureBlob) -> None:
            self.location = location

        def upload_blob(self, data: bytes, **kwargs: object) -> None:
            uploaded.append((self.location.container, self.location.blob, data))

    monkeypatch.setattr(store, "_blob_client", _Client)
    uri = store.put_bytes("a b/c.pdf", b"%PDF", content_type="application/pdf")
    assert uri == "https://mystore.blob.core.windows.net/uploads/a%20b/c.pdf"
    assert uploaded == [("uploads", "a b/c.pdf", b"%PDF")]
    assert resolve_blob_uri(uri, settings) == AzureBlob(
        uri=uri,
        account="mystore",
        endpoint="https://mystore.blob.core.windows.net",
        container="uploads",
        blob="a b/c.pdf",
    )
    assert not list(root.iterdir())
