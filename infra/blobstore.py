"""Blob storage behind one small interface: local files and Azure Blob Storage.

Every URI that arrives in an event is untrusted. :func:`resolve_blob_uri` is the
single gate (SSRF and path-traversal guard) and is pure: it never opens a
connection or a file descriptor. Accepted forms:

* ``file:///abs/path`` only when the path's realpath (``..`` and symlinks
  resolved) stays inside ``BlobSettings.local_root``.
* ``https://<account>.blob.core.windows.net/<container>/<blob>`` only when
  ``account`` is in ``azure_accounts`` and ``container`` is in
  ``azure_containers`` (an empty list allows any container of an allowed account).
* ``<endpoint>/<container>/<blob>`` where ``<endpoint>`` is an entry of
  ``azure_endpoints`` (emulator or private endpoint, e.g.
  ``http://127.0.0.1:10000/devstoreaccount1``), matched on scheme, host, port and
  path prefix. The ``BlobEndpoint`` of the configured connection string counts as
  such an entry too: it is operator configuration, not event input.

Everything else (other hosts, IP literals, metadata endpoints, userinfo
``acct.blob.core.windows.net@evil.com``, explicit odd ports, query strings,
``ftp://``, dot segments) is refused with ``BlobNotAllowed``.

The store's own upload and claim-check containers are always allowed for the
upload account, so what ``put_*`` returns can always be read back.

Downloads stream in ``chunk_bytes`` pieces into a temp file and stop as soon as
``max_bytes`` is passed; nothing holds a whole blob in memory.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import stat
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import SplitResult, quote, unquote, urlsplit

from colstream.infra.settings import BlobSettings, ColstreamSettings
from colstream.schemas.errors import PipelineError

BlobErrorType = Literal["BlobNotFound", "BlobNotAllowed", "BlobTooLarge", "BlobUnavailable"]

_AZURE_HOST_SUFFIX = ".blob.core.windows.net"
_ACCOUNT_RE = re.compile(r"^[a-z0-9]{3,24}$")
_CONTAINER_RE = re.compile(r"^(?:\$root|[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62})$")
_MAX_BLOB_NAME = 1024


class BlobError(PipelineError):
    """A blob could not be used; ``error_type`` says why in one word for DLQ records."""

    def __init__(self, error_type: BlobErrorType, message: str, uri: str | None = None) -> None:
        super().__init__(error_type, message)
        self.error_type: BlobErrorType = error_type
        self.message = message
        self.uri = uri

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the error intact across process pools (the splitter's workers).
        return (type(self), (self.error_type, self.message, self.uri))

    def __str__(self) -> str:
        return f"{self.error_type}: {self.message}"


def _not_allowed(uri: str, why: str) -> BlobError:
    return BlobError(
        "BlobNotAllowed",
        f"{why}; refusing {_redact(uri)!r}. Allowed: file:// under BlobSettings.local_root, "
        "https://<account>.blob.core.windows.net/<container>/<blob> for allowlisted accounts and "
        "containers (COLSTREAM_BLOB__AZURE_ACCOUNTS / __AZURE_CONTAINERS), or a configured "
        "emulator endpoint (COLSTREAM_BLOB__AZURE_ENDPOINTS)",
        uri,
    )


def _redact(uri: str) -> str:
    # Never echo a SAS signature into logs or DLQ records.
    return uri.split("?", 1)[0][:300]


@dataclass(frozen=True)
class LocalBlob:
    uri: str
    path: Path

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class AzureBlob:
    uri: str
    account: str
    endpoint: str  # e.g. https://acct.blob.core.windows.net or http://127.0.0.1:10000/devstoreaccount1
    container: str
    blob: str  # decoded blob name, may contain '/'

    @property
    def name(self) -> str:
        return self.blob.rsplit("/", 1)[-1]


BlobLocation = LocalBlob | AzureBlob


# --------------------------------------------------------------------------- gate


def parse_connection_string(value: str) -> dict[str, str]:
    if value.strip() == "UseDevelopmentStorage=true":
        from colstream.infra.azurite import AZURITE_CONNECTION_STRING

        value = AZURITE_CONNECTION_STRING
    parts: dict[str, str] = {}
    for item in value.split(";"):
        if "=" in item:
            key, _, val = item.partition("=")
            parts[key.strip()] = val.strip()
    return parts


def _connection_account(settings: BlobSettings) -> tuple[str | None, str | None]:
    """(account, blob endpoint) named by the configured connection string, if any."""
    if settings.azure_connection_string is None:
        return None, None
    parts = parse_connection_string(settings.azure_connection_string.get_secret_value())
    account = parts.get("AccountName")
    endpoint = parts.get("BlobEndpoint")
    if endpoint is None and account:
        protocol = parts.get("DefaultEndpointsProtocol", "https")
        suffix = parts.get("EndpointSuffix", "core.windows.net")
        endpoint = f"{protocol}://{account}.blob.{suffix}"
    if account is None and endpoint:
        host = urlsplit(endpoint).hostname or ""
        account = host.split(".", 1)[0] or None
    return account, endpoint.rstrip("/") if endpoint else None


def effective_endpoints(settings: BlobSettings) -> dict[str, str]:
    """Custom endpoints per account: ``azure_endpoints`` plus the connection string's."""
    endpoints = {account: url.rstrip("/") for account, url in settings.azure_endpoints.items()}
    account, endpoint = _connection_account(settings)
    if account and endpoint and account not in endpoints and not _is_public_endpoint(account, endpoint):
        endpoints[account] = endpoint
    return endpoints


def _is_public_endpoint(account: str, endpoint: str) -> bool:
    return endpoint.rstrip("/").lower() == f"https://{account}{_AZURE_HOST_SUFFIX}"


def upload_account(settings: BlobSettings) -> str | None:
    if settings.azure_upload_account:
        return settings.azure_upload_account
    account, _ = _connection_account(settings)
    if account:
        return account
    if len(settings.azure_accounts) == 1:
        return settings.azure_accounts[0]
    if len(settings.azure_endpoints) == 1:
        return next(iter(settings.azure_endpoints))
    return None


def _own_containers(settings: BlobSettings) -> set[str]:
    return {c for c in (settings.azure_upload_container, settings.claim_check_container) if c}


def _split_container_blob(uri: str, path: str) -> tuple[str, str]:
    """'/container/some/blob' (still percent-encoded) -> ('container', 'some/blob')."""
    if not path.startswith("/"):
        raise _not_allowed(uri, "blob URL has no /<container>/<blob> path")
    container_raw, sep, blob_raw = path[1:].partition("/")
    if not sep or not blob_raw:
        raise _not_allowed(uri, "blob URL must name a container and a blob")
    container = unquote(container_raw)
    blob = unquote(blob_raw)
    if not _CONTAINER_RE.match(container):
        raise _not_allowed(uri, f"{container!r} is not a valid container name")
    if len(blob) > _MAX_BLOB_NAME or any(ord(ch) < 0x20 or ch == "\\" for ch in blob):
        raise _not_allowed(uri, "blob name is too long or contains control characters or backslashes")
    if any(segment in (".", "..") for segment in blob.split("/")):
        raise _not_allowed(uri, "blob name contains '.' or '..' segments")
    return container, blob


def _check_container(uri: str, settings: BlobSettings, account: str, container: str) -> None:
    allowed = settings.azure_containers
    if not allowed or container in allowed:
        return
    if account == upload_account(settings) and container in _own_containers(settings):
        return
    raise _not_allowed(uri, f"container {container!r} is not in BlobSettings.azure_containers")


def _resolve_file(uri: str, settings: BlobSettings) -> LocalBlob:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise _not_allowed(uri, "file:// URIs must not name a host")
    if parts.query or parts.fragment:
        raise _not_allowed(uri, "file:// URIs must not carry a query or fragment")
    raw_path = unquote(parts.path)
    if not raw_path.startswith("/") or "\0" in raw_path:
        raise _not_allowed(uri, "file:// URIs must hold an absolute path")
    root = os.path.realpath(settings.local_root)
    # realpath resolves '..' and every symlink on the way, so a link under the root
    # that points outside it is caught here.
    real = os.path.realpath(raw_path)
    if real == root or os.path.commonpath([root, real]) != root:
        raise _not_allowed(uri, f"path is outside the local blob root {root}")
    return LocalBlob(uri=uri, path=Path(real))


def _endpoint_match(uri: str, parts: Any, endpoints: dict[str, str]) -> tuple[str, str, str] | None:
    """(account, endpoint, remaining path) when the URI sits under a configured endpoint."""
    for account, endpoint in endpoints.items():
        ep = urlsplit(endpoint)
        if (
            ep.scheme == parts.scheme
            and (ep.hostname or "") == parts.hostname
            and ep.port == parts.port
            and not ep.username
        ):
            prefix = ep.path.rstrip("/")
            if parts.path.startswith(prefix + "/"):
                return account, endpoint, parts.path[len(prefix) :]
    return None


def resolve_blob_uri(uri: str, settings: BlobSettings) -> BlobLocation:
    """Check a URI against the allowlist and say where it points. Pure: no I/O but realpath."""
    _check_uri_text(uri)
    scheme = uri.split(":", 1)[0].lower()
    if scheme == "file":
        return _resolve_file(uri, settings)
    if scheme not in ("https", "http"):
        raise _not_allowed(uri, f"scheme {scheme!r} is not supported")
    parts, port = _parsed_url(uri)
    match = _endpoint_match(uri, parts, effective_endpoints(settings))
    if match is not None:  # a configured endpoint: an emulator, a sovereign cloud, a private link
        account, endpoint, rest = match
        container, blob = _split_container_blob(uri, rest)
        _check_container(uri, settings, account, container)
        return AzureBlob(uri=uri, account=account, endpoint=endpoint, container=container, blob=blob)
    account = _public_azure_account(uri, scheme, (parts.hostname or "").lower(), port)
    container, blob = _split_container_blob(uri, parts.path)
    _check_account_allowed(uri, settings, account, container)
    return AzureBlob(
        uri=uri,
        account=account,
        endpoint=f"https://{account}{_AZURE_HOST_SUFFIX}",
        container=container,
        blob=blob,
    )


def _check_uri_text(uri: str) -> None:
    if not isinstance(uri, str) or not uri or len(uri) > 4096:
        raise _not_allowed(str(uri)[:100], "blob URI is empty or too long")
    if any(ch.isspace() or ord(ch) < 0x20 for ch in uri):
        raise _not_allowed(uri, "blob URI contains whitespace or control characters")


def _parsed_url(uri: str) -> tuple[SplitResult, int | None]:
    """An http(s) URL without userinfo, query or fragment, and with a host."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as error:
        raise _not_allowed(uri, f"malformed URL ({error})") from None
    if "@" in parts.netloc or parts.username is not None or parts.password is not None:
        raise _not_allowed(uri, "URLs with userinfo ('user@host') are refused")
    if parts.query or parts.fragment:
        raise _not_allowed(
            uri, "blob URLs must not carry a query or fragment (credentials come from settings, not events)"
        )
    if not parts.hostname:
        raise _not_allowed(uri, "URL has no host")
    return parts, port


def _public_azure_account(uri: str, scheme: str, host: str, port: int | None) -> str:
    """The storage account of an ``https://<account>.blob.core.windows.net`` URL."""
    if scheme != "https":
        raise _not_allowed(uri, "plain http:// is only accepted for a configured emulator endpoint")
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host.strip("[]"))
        raise _not_allowed(uri, "IP-literal hosts are refused")
    if port not in (None, 443):
        raise _not_allowed(uri, f"port {port} is not the Azure Blob Storage port")
    if not host.endswith(_AZURE_HOST_SUFFIX):
        raise _not_allowed(uri, f"host {host!r} is not an Azure Blob Storage account host")
    account = host[: -len(_AZURE_HOST_SUFFIX)]
    if not _ACCOUNT_RE.match(account):
        raise _not_allowed(uri, f"{account!r} is not a storage account name")
    return account


def _check_account_allowed(uri: str, settings: BlobSettings, account: str, container: str) -> None:
    if account in settings.azure_accounts:
        _check_container(uri, settings, account, container)
        return
    # The upload account is readable without an allowlist entry, but only its upload
    # and claim-check containers: what the store itself wrote.
    own = settings.azure_upload_container and account == upload_account(settings)
    if not (own and container in _own_containers(settings)):
        raise _not_allowed(uri, f"storage account {account!r} is not in BlobSettings.azure_accounts")


def _safe_blob_name(name: str) -> str:
    """Names the store itself writes: relative, no dot segments, no backslashes."""
    cleaned = name.strip()
    if (
        not cleaned
        or cleaned.startswith("/")
        or "\\" in cleaned
        or "\0" in cleaned
        or len(cleaned) > _MAX_BLOB_NAME
        or any(seg in ("", ".", "..") for seg in cleaned.split("/"))
    ):
        raise BlobError(
            "BlobNotAllowed",
            f"blob name {name[:200]!r} must be a relative path without empty, '.' or '..' segments",
        )
    return cleaned


def _too_large(uri: str, size: int | None, max_bytes: int) -> BlobError:
    seen = f"{size} bytes" if size is not None else "more bytes"
    return BlobError(
        "BlobTooLarge",
        f"blob holds {seen} than the limit of {max_bytes} bytes; raise COLSTREAM_LIMITS__MAX_BLOB_BYTES "
        "if such documents are expected",
        uri,
    )


# --------------------------------------------------------------------------- store


class BlobStore:
    """Routes blob URIs to the local file system or Azure; see the module docstring."""

    def __init__(self, settings: BlobSettings, default_max_bytes: int | None = None) -> None:
        self.settings = settings
        self.default_max_bytes = default_max_bytes
        self._clients: dict[str, Any] = {}
        self._clients_lock = threading.Lock()
        self._credential: Any = None

    # ---- public API -------------------------------------------------------

    def resolve(self, uri: str) -> BlobLocation:
        return resolve_blob_uri(uri, self.settings)

    @contextlib.contextmanager
    def download(self, uri: str, max_bytes: int) -> Iterator[Path]:
        """Yield a local path holding the blob; temp copies are removed on exit."""
        location = self.resolve(uri)
        if isinstance(location, LocalBlob):
            yield self._checked_local_file(location, max_bytes)
            return
        fd, temp_name = tempfile.mkstemp(
            prefix="colstream-blob-", suffix=Path(location.name).suffix[:16], dir=self._download_dir()
        )
        temp_path = Path(temp_name)
        try:
            with os.fdopen(fd, "wb") as sink:
                self._stream_azure(location, max_bytes, sink)
            yield temp_path
        finally:
            temp_path.unlink(missing_ok=True)

    def get_bytes(self, uri: str, max_bytes: int) -> bytes:
        """Small blobs (claim-check references) straight into memory, still bounded."""
        location = self.resolve(uri)
        if isinstance(location, LocalBlob):
            path = self._checked_local_file(location, max_bytes)
            with open(path, "rb") as source:
                data = source.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise _too_large(uri, None, max_bytes)
            return data
        import io

        buffer = io.BytesIO()
        self._stream_azure(location, max_bytes, buffer)
        return buffer.getvalue()

    def put_bytes(self, name: str, data: bytes, content_type: str | None = None) -> str:
        name = _safe_blob_name(name)
        if self.settings.azure_upload_container:
            return self._upload_azure(name, data, len(data), content_type)
        target = self._local_target(name)
        self._write_local_atomically(target, lambda sink: sink.write(data))
        return target.as_uri()

    def put_file(self, path: Path, name: str, content_type: str | None = None) -> str:
        name = _safe_blob_name(name)
        path = Path(path)
        if self.settings.azure_upload_container:
            with open(path, "rb") as source:
                return self._upload_azure(name, source, os.fstat(source.fileno()).st_size, content_type)
        target = self._local_target(name)
        if os.path.realpath(path) == str(target):
            return target.as_uri()

        def copy(sink: IO[bytes]) -> None:
            with open(path, "rb") as source:
                while chunk := source.read(self.settings.chunk_bytes):
                    sink.write(chunk)

        self._write_local_atomically(target, copy)
        return target.as_uri()

    def delete(self, uri: str) -> None:
        """Remove a blob; deleting one that is already gone is not an error."""
        location = self.resolve(uri)
        if isinstance(location, LocalBlob):
            location.path.unlink(missing_ok=True)
            return
        from azure.core.exceptions import ResourceNotFoundError

        client = self._blob_client(location)
        try:
            client.delete_blob()
        except ResourceNotFoundError:
            return
        except Exception as error:
            raise self._translate(location, error) from error

    def close(self) -> None:
        with self._clients_lock:
            clients, self._clients = self._clients, {}
        for client in clients.values():
            with contextlib.suppress(Exception):
                client.close()

    # ---- local ------------------------------------------------------------

    def _checked_local_file(self, location: LocalBlob, max_bytes: int) -> Path:
        try:
            info = location.path.stat()
        except FileNotFoundError:
            raise BlobError(
                "BlobNotFound",
                f"no file at {location.path}; was it deleted after the upload event?",
                location.uri,
            ) from None
        except OSError as error:
            raise BlobError(
                "BlobUnavailable", f"cannot stat {location.path}: {error}", location.uri
            ) from error
        if not stat.S_ISREG(info.st_mode):
            raise BlobError("BlobNotAllowed", f"{location.path} is not a regular file", location.uri)
        if info.st_size > max_bytes:
            raise _too_large(location.uri, info.st_size, max_bytes)
        return location.path

    def _local_root(self) -> Path:
        root = Path(self.settings.local_root)
        root.mkdir(parents=True, exist_ok=True)
        return Path(os.path.realpath(root))

    def _local_target(self, name: str) -> Path:
        root = self._local_root()
        target = Path(os.path.realpath(root / name))
        if os.path.commonpath([str(root), str(target)]) != str(root) or target == root:
            raise BlobError("BlobNotAllowed", f"blob name {name!r} escapes the local blob root {root}")
        return target

    def _write_local_atomically(self, target: Path, write: Any) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Readers must never see half a file: write beside it, then rename.
        fd, temp_name = tempfile.mkstemp(prefix=".incoming-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as sink:
                write(sink)
                sink.flush()
                os.fsync(sink.fileno())
            os.replace(temp_name, target)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise

    def _download_dir(self) -> str | None:
        if self.settings.download_dir is None:
            return None
        Path(self.settings.download_dir).mkdir(parents=True, exist_ok=True)
        return str(self.settings.download_dir)

    # ---- azure ------------------------------------------------------------

    def _stream_azure(self, location: AzureBlob, max_bytes: int, sink: IO[bytes]) -> None:
        client = self._blob_client(location)
        written = 0
        try:
            downloader = client.download_blob()
            size = getattr(downloader, "size", None)
            if size is not None and size > max_bytes:
                raise _too_large(location.uri, size, max_bytes)
            for chunk in downloader.chunks():
                written += len(chunk)
                # The size header can lie (blob replaced mid-download): count too.
                if written > max_bytes:
                    raise _too_large(location.uri, None, max_bytes)
                sink.write(chunk)
        except BlobError:
            raise
        except Exception as error:
            raise self._translate(location, error) from error

    def _upload_azure(self, name: str, data: Any, length: int, content_type: str | None) -> str:
        from azure.core.exceptions import ResourceNotFoundError
        from azure.storage.blob import ContentSettings

        container = self.settings.azure_upload_container
        assert container is not None
        account = upload_account(self.settings)
        if account is None:
            raise BlobError(
                "BlobUnavailable",
                "no storage account to upload to: set COLSTREAM_BLOB__AZURE_UPLOAD_ACCOUNT "
                "or a connection string",
            )
        endpoint = effective_endpoints(self.settings).get(account, f"https://{account}{_AZURE_HOST_SUFFIX}")
        uri = f"{endpoint}/{container}/{quote(name, safe='/')}"
        location = AzureBlob(uri=uri, account=account, endpoint=endpoint, container=container, blob=name)
        client = self._blob_client(location)
        settings = ContentSettings(content_type=content_type) if content_type else None
        start = data.tell() if hasattr(data, "tell") else None
        try:
            try:
                client.upload_blob(data, length=length, overwrite=True, content_settings=settings)
            except ResourceNotFoundError:
                # First upload into a fresh account: create the container once.
                self._service_client(account, endpoint).create_container(container)
                if start is not None:
                    data.seek(start)
                client.upload_blob(data, length=length, overwrite=True, content_settings=settings)
        except BlobError:
            raise
        except Exception as error:
            raise self._translate(location, error) from error
        return uri

    def _blob_client(self, location: AzureBlob) -> Any:
        return self._service_client(location.account, location.endpoint).get_blob_client(
            location.container, location.blob
        )

    def _service_client(self, account: str, endpoint: str) -> Any:
        key = f"{account}|{endpoint}"
        with self._clients_lock:
            client = self._clients.get(key)
            if client is None:
                from azure.storage.blob import BlobServiceClient

                client = BlobServiceClient(
                    account_url=endpoint,
                    credential=self._credential_for(account),
                    max_single_get_size=self.settings.chunk_bytes,
                    max_chunk_get_size=self.settings.chunk_bytes,
                    connection_timeout=self.settings.azure_timeout_s,
                    read_timeout=self.settings.azure_timeout_s,
                    retry_total=3,
                )
                self._clients[key] = client
            return client

    def _credential_for(self, account: str) -> Any:
        auth = self.settings.azure_auth
        if auth == "sas":
            if self.settings.azure_sas_token is None:
                raise BlobError(
                    "BlobUnavailable", "azure_auth is 'sas' but COLSTREAM_BLOB__AZURE_SAS_TOKEN is not set"
                )
            return self.settings.azure_sas_token.get_secret_value().lstrip("?")
        if auth == "default_credential":
            if self._credential is None:
                from azure.identity import DefaultAzureCredential

                self._credential = DefaultAzureCredential()
            return self._credential
        if self.settings.azure_connection_string is None:
            raise BlobError(
                "BlobUnavailable",
                "azure_auth is 'connection_string' but COLSTREAM_BLOB__AZURE_CONNECTION_STRING is not set "
                "(or choose azure_auth=sas / default_credential)",
            )
        parts = parse_connection_string(self.settings.azure_connection_string.get_secret_value())
        conn_account, _ = _connection_account(self.settings)
        if conn_account and conn_account != account:
            raise BlobError(
                "BlobUnavailable",
                f"the connection string is for account {conn_account!r}, not {account!r}; use "
                "azure_auth=default_credential to read several accounts",
            )
        if "AccountKey" in parts:
            return {"account_name": conn_account or account, "account_key": parts["AccountKey"]}
        if "SharedAccessSignature" in parts:
            return parts["SharedAccessSignature"].lstrip("?")
        raise BlobError(
            "BlobUnavailable", "the connection string holds neither AccountKey nor SharedAccessSignature"
        )

    def _translate(self, location: AzureBlob, error: Exception) -> BlobError:
        from azure.core.exceptions import (
            ClientAuthenticationError,
            HttpResponseError,
            ResourceNotFoundError,
            ServiceRequestError,
        )

        where = f"{location.container}/{location.blob} in account {location.account}"
        if isinstance(error, ResourceNotFoundError):
            return BlobError(
                "BlobNotFound", f"no blob {where}; was it deleted after the upload event?", location.uri
            )
        if isinstance(error, ClientAuthenticationError) or (
            isinstance(error, HttpResponseError) and error.status_code in (401, 403)
        ):
            return BlobError(
                "BlobUnavailable",
                f"access to {where} was denied; check COLSTREAM_BLOB__AZURE_AUTH and its credential "
                "(SAS permissions/expiry, role assignment 'Storage Blob Data Reader')",
                location.uri,
            )
        if isinstance(error, ServiceRequestError):
            return BlobError(
                "BlobUnavailable", f"cannot reach {location.endpoint} for {where}: {error}", location.uri
            )
        first_line = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
        return BlobError("BlobUnavailable", f"reading {where} failed: {first_line}", location.uri)


def open_blob_store(settings: ColstreamSettings) -> BlobStore:
    return BlobStore(settings.blob, default_max_bytes=settings.limits.max_blob_bytes)
