"""``GET /documents/{id}/pages/{n}/image``: a page as WebP or JPEG, for people to look at.

Pages are rendered on demand from the document's stored blob (downloaded under
the same size limit as ingestion, rendered in a killable child process, see
:mod:`colstream.api.page_render`) and kept in a disk cache with a bound on its
total size, least recently used first out.

The cache key is the document id, its **version**, the page and the width, so a
re-uploaded document never serves the pages of the upload it replaced; a
deleted document answers 404 before the cache is looked at, and both cases
remove the document's older images from disk when they are noticed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from colstream.api.auth import Principal
from colstream.api.page_render import ImageFormat, PageImage, PageImageError, render_in_child
from colstream.consumers.splitter.convert import OfficeConverter, sniff_office_format
from colstream.consumers.splitter.render import DocumentError, read_head, sniff_kind
from colstream.infra.settings import ColstreamSettings, ConverterSettings, PageImageSettings
from colstream.schemas.events import DocumentRecord

log = logging.getLogger(__name__)

ScopeDependency = Callable[..., Any]
Renderer = Callable[[Path, int, int, ImageFormat], PageImage]


@runtime_checkable
class BlobReaderLike(Protocol):
    def download(self, uri: str, max_bytes: int) -> AbstractContextManager[Path]: ...


# ----------------------------------------------------------------------------- cache


class PageImageCache:
    """Files under ``root``, one directory per document, bounded to ``max_bytes`` in total.

    Recency lives in each file's modification time (touched on every hit), so the
    order survives a restart; the index in memory is rebuilt from the disk at start.
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[Path, int] = OrderedDict()
        self._total = 0
        self.root.mkdir(parents=True, exist_ok=True)
        found = []
        for path in self.root.glob("*/*"):
            if path.is_file() and not path.name.startswith("."):
                stat = path.stat()
                found.append((stat.st_mtime_ns, path, stat.st_size))
        for _, path, size in sorted(found):
            self._entries[path] = size
            self._total += size
        with self._lock:
            self._evict()

    @property
    def total_bytes(self) -> int:
        return self._total

    def _document_dir(self, document_id: str) -> Path:
        return self.root / hashlib.sha256(document_id.encode("utf-8")).hexdigest()[:40]

    def path_for(self, document_id: str, version: int, page: int, width: int, image_format: ImageFormat) -> Path:
        return self._document_dir(document_id) / f"v{version}-p{page}-w{width}.{image_format}"

    def get(self, document_id: str, version: int, page: int, width: int, image_format: ImageFormat) -> bytes | None:
        path = self.path_for(document_id, version, page, width, image_format)
        with self._lock:
            if path not in self._entries:
                return None
            try:
                data = path.read_bytes()
                os.utime(path)
            except FileNotFoundError:  # removed by another replica sharing the directory
                self._forget(path)
                return None
            self._entries.move_to_end(path)
            return data

    def put(self, document_id: str, version: int, page: int, width: int, image_format: ImageFormat,
            data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        path = self.path_for(document_id, version, page, width, image_format)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as sink:
                sink.write(data)
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        with self._lock:
            self._forget(path)
            self._entries[path] = len(data)
            self._total += len(data)
            self._evict()

    def drop_document(self, document_id: str, below_version: int | None = None) -> int:
        """Remove a document's images (only versions below ``below_version`` when given)."""
        directory = self._document_dir(document_id)
        removed = 0
        with self._lock:
            for path in [p for p in self._entries if p.parent == directory]:
                if below_version is not None and _version_of(path) >= below_version:
                    continue
                path.unlink(missing_ok=True)
                self._forget(path)
                removed += 1
            with contextlib.suppress(OSError):
                directory.rmdir()  # only when empty
        return removed

    def _forget(self, path: Path) -> None:
        size = self._entries.pop(path, None)
        if size is not None:
            self._total -= size

    def _evict(self) -> None:
        while self._total > self.max_bytes and self._entries:
            path, size = self._entries.popitem(last=False)
            self._total -= size
            path.unlink(missing_ok=True)


def _version_of(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[0][1:])
    except ValueError:
        return -1


# ----------------------------------------------------------------------------- converted documents

# Office, HTML and text documents are converted to PDF once per version and kept for the
# page images that follow (a result list asks for several pages of one document).
MAX_CONVERTED_DOCUMENTS = 16


class ConvertedDocuments:
    """The file a page image renders from: the blob itself when PDFium or Pillow opens it,
    else the PDF LibreOffice exports from it (the splitter's converter: sandboxed, no
    network, bounded in time and memory), kept for the last ``keep`` document versions."""

    def __init__(self, root: Path, settings: ConverterSettings, keep: int = MAX_CONVERTED_DOCUMENTS) -> None:
        self.root = root
        self.settings = settings
        self.keep = keep
        self.conversions = 0
        self._converter: OfficeConverter | None = None
        self._lock = threading.Lock()

    def renderable(self, path: Path, document_id: str, version: int) -> Path:
        """Raises :class:`DocumentError` when the content is no format the splitter takes."""
        try:
            sniff_kind(read_head(path))
            return path
        except DocumentError as refused:
            office_format = sniff_office_format(path, self.settings)
            if refused.error_type != "UnsupportedFormat" or office_format is None:
                raise
        digest = hashlib.sha256(document_id.encode()).hexdigest()[:32]
        target = self.root / f"{digest}-v{version}.pdf"
        # One conversion at a time: LibreOffice is the expensive part, and two requests for
        # pages of one new document must not convert it twice.
        with self._lock:
            if target.exists():
                os.utime(target)
                return target
            if self._converter is None:
                self._converter = OfficeConverter(self.settings)
            self.root.mkdir(parents=True, exist_ok=True)
            with self._converter.to_pdf(path, office_format) as pdf:
                partial = target.with_suffix(".partial")
                shutil.copyfile(pdf, partial)
                os.replace(partial, target)
            self.conversions += 1
            kept = sorted(self.root.glob("*.pdf"), key=lambda p: p.stat().st_mtime, reverse=True)
            for stale in kept[self.keep :]:
                stale.unlink(missing_ok=True)
            return target

    def close(self) -> None:
        with self._lock:
            if self._converter is not None:
                self._converter.close()
                self._converter = None


# ----------------------------------------------------------------------------- service


class PageImages:
    """Looks a page up in the cache, or renders it from the record's blob."""

    def __init__(
        self,
        settings: ColstreamSettings,
        blob_reader: Callable[[], Any],
        *,
        renderer: Renderer | None = None,
        cache: PageImageCache | None = None,
    ) -> None:
        self.settings: PageImageSettings = settings.page_images
        self.limits = settings.limits
        self._default_root = settings.state_dir / "page-images"
        self._blob_reader = blob_reader
        self._renderer = renderer or self._render_in_child
        self._cache = cache
        self._cache_lock = threading.Lock()
        self._renders = threading.BoundedSemaphore(self.settings.max_concurrent_renders)
        self.renders = 0
        root = self.settings.cache_dir or self._default_root
        # Beside the image cache, not in it: its byte bound counts page images only.
        self.converted = ConvertedDocuments(root.with_name(f"{root.name}-converted"), settings.converter)

    @property
    def cache(self) -> PageImageCache:
        with self._cache_lock:
            if self._cache is None:
                root = self.settings.cache_dir or self._default_root
                self._cache = PageImageCache(root, self.settings.cache_max_bytes)
            return self._cache

    def _render_in_child(self, path: Path, page: int, width: int, image_format: ImageFormat) -> PageImage:
        return render_in_child(path, page, width, image_format, self.limits, self.settings.render_timeout_s)

    def image(self, record: DocumentRecord, page: int, width: int, image_format: ImageFormat) -> bytes:
        """The encoded image, raising :class:`HTTPException` for what the caller can act on."""
        cache = self.cache
        if record.state == "deleted":
            cache.drop_document(record.document_id)
            raise HTTPException(404, f"document {record.document_id!r} not found")
        cache.drop_document(record.document_id, below_version=record.version)
        if record.total_pages < 1:
            raise HTTPException(404, f"document {record.document_id!r} has no pages yet (state {record.state})")
        if not 1 <= page <= record.total_pages:
            raise HTTPException(404, f"page {page} is outside 1..{record.total_pages} of {record.document_id!r}")
        if page in record.failed_pages:
            raise HTTPException(404, f"page {page} of {record.document_id!r} failed to index and has no image")
        cached = cache.get(record.document_id, record.version, page, width, image_format)
        if cached is not None:
            return cached
        if not record.blob_uri:
            raise HTTPException(404, f"document {record.document_id!r} has no stored blob to render from")
        image = self._render(record, record.blob_uri, page, width, image_format)
        cache.put(record.document_id, record.version, page, width, image_format, image.data)
        return image.data

    def _render(
        self, record: DocumentRecord, blob_uri: str, page: int, width: int, image_format: ImageFormat
    ) -> PageImage:
        if not self._renders.acquire(timeout=self.settings.render_timeout_s):
            raise HTTPException(503, "every page renderer is busy; retry shortly", headers={"Retry-After": "2"})
        try:
            reader = self._blob_reader()
            if not isinstance(reader, BlobReaderLike):
                raise HTTPException(503, "this server's blob store cannot be read from")
            try:
                with _downloaded(reader, blob_uri, self.limits.max_blob_bytes) as path:
                    source = self.converted.renderable(path, record.document_id, record.version)
                    self.renders += 1
                    return self._renderer(source, page, width, image_format)
            except (PageImageError, DocumentError) as exc:
                raise HTTPException(422, f"page {page} cannot be rendered: {exc.message} ({exc.error_type})") from exc
            except HTTPException:
                raise
            except Exception as exc:
                error_type = getattr(exc, "error_type", None)
                if error_type == "BlobNotFound":
                    raise HTTPException(404, "the document's blob is no longer stored") from exc
                if error_type in ("BlobNotAllowed", "BlobTooLarge"):
                    raise HTTPException(422, f"the document's blob cannot be read: {error_type}") from exc
                log.exception("page image: reading the blob failed")
                raise HTTPException(503, f"blob storage unavailable: {type(exc).__name__}") from exc
        finally:
            self._renders.release()


@contextlib.contextmanager
def _downloaded(reader: BlobReaderLike, uri: str, max_bytes: int) -> Iterator[Path]:
    with reader.download(uri, max_bytes) as path:
        yield path


# ----------------------------------------------------------------------------- route


def build_page_image_router(
    settings: ColstreamSettings,
    read_record: Callable[[str], Any],
    images: PageImages,
    read_scope: ScopeDependency,
) -> APIRouter:
    """``read_record(document_id)`` is awaited and returns the sink's record or None;
    ``read_scope`` is the dependency that authenticates a caller holding ``read``."""
    router = APIRouter(tags=["documents"])
    page_settings = settings.page_images

    @router.get(
        "/documents/{document_id:path}/pages/{page_number}/image",
        response_class=Response,
        responses={
            200: {"content": {"image/webp": {}, "image/jpeg": {}}, "description": "The page image."},
            304: {"description": "The image the caller holds (If-None-Match) is current."},
            400: {"description": "The width is above the configured maximum."},
            404: {"description": "No such document, page, or image."},
            422: {"description": "The page cannot be rendered."},
            503: {"description": "Renderers busy or blob storage unavailable."},
        },
        summary="A page of a document as an image",
    )
    async def page_image(
        request: Request,
        document_id: str,
        page_number: int,
        width: int | None = Query(None, ge=16, description="Pixels; the configured default when absent."),
        image_format: ImageFormat | None = Query(None, alias="format", description="webp or jpeg."),
        principal: Principal = Depends(read_scope),
    ) -> Response:
        wanted = width or page_settings.default_width
        if wanted > page_settings.max_width:
            raise HTTPException(
                400, f"width {wanted} is above the {page_settings.max_width}-pixel maximum "
                     "(COLSTREAM_PAGE_IMAGES__MAX_WIDTH)"
            )
        fmt: ImageFormat = image_format or page_settings.image_format
        record: DocumentRecord | None = await read_record(document_id)
        # Another tenant's document answers exactly as a missing one does.
        if record is None or not principal.sees(record.metadata):
            raise HTTPException(404, f"document {document_id!r} not found")
        etag = f'"{record.version}-{page_number}-{wanted}-{fmt}"'
        headers = {"ETag": etag, "Cache-Control": "private, no-cache", "Vary": "Authorization, X-API-Key"}
        if record.state != "deleted" and request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        data = await run_in_threadpool(images.image, record, page_number, wanted, fmt)
        return Response(content=data, media_type=f"image/{fmt}", headers=headers)

    return router
