"""Rendering one page image for people to look at, in a process of its own.

The splitter's render core (:mod:`colstream.consumers.splitter.render`) opens
and validates the document under the same limits as ingestion; this module asks
it for one page at a requested width and re-encodes it as WebP or JPEG.

Each render runs in a fresh child process (forked from the multiprocessing
forkserver, which already holds PDFium and Pillow), because PDFium is not
thread-safe and a hostile file may hang or crash it: a child that runs past
its time is killed, one that dies fails only its own request. This module
imports nothing from the web stack, so starting a child stays cheap.
"""

from __future__ import annotations

import io
import multiprocessing
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from colstream.consumers.splitter.render import (
    DocumentError,
    DocumentKind,
    PageError,
    PlainTarget,
    read_head,
    render_page,
    sniff_kind,
)
from colstream.infra.settings import LimitSettings
from colstream.schemas.errors import PipelineError

ImageFormat = Literal["webp", "jpeg"]

MEDIA_TYPES: dict[ImageFormat, str] = {"webp": "image/webp", "jpeg": "image/jpeg"}
QUALITY: dict[ImageFormat, int] = {"webp": 80, "jpeg": 85}
# A page taller than this many widths is narrowed so its pixels stay bounded (receipt rolls, banners).
MAX_HEIGHT_IN_WIDTHS = 4


class PageImageError(PipelineError):
    """The page cannot be shown; ``error_type`` is the render core's (or a timeout or crash)."""


@dataclass(frozen=True, slots=True)
class PageImage:
    data: bytes
    width: int
    height: int
    image_format: ImageFormat

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.image_format]


def target_for_width(width: int) -> PlainTarget:
    """The shorter side at ``width`` (so a portrait page is exactly ``width`` wide and a
    landscape one is narrowed afterwards), with pixels bounded for extreme aspect ratios."""
    return PlainTarget(min_side=width, max_pixels=width * width * MAX_HEIGHT_IN_WIDTHS)


def render_page_image(
    path: Path, page_number: int, width: int, image_format: ImageFormat, limits: LimitSettings
) -> PageImage:
    """Page ``page_number`` of the file at ``path``, at most ``width`` pixels wide (raster
    images are never enlarged). Raises :class:`DocumentError` or :class:`PageError`."""
    kind: DocumentKind = sniff_kind(read_head(path))
    rendered = render_page(path, kind, page_number, target_for_width(width), limits)
    with Image.open(io.BytesIO(rendered.data)) as decoded:
        image = decoded.convert("RGB")
    if image.width > width:
        height = max(1, round(image.height * width / image.width))
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format.upper(), quality=QUALITY[image_format])
    return PageImage(buffer.getvalue(), image.width, image.height, image_format)


def _child_main(
    conn: Connection, path: str, page_number: int, width: int, image_format: ImageFormat, limits: LimitSettings
) -> None:
    try:
        image = render_page_image(Path(path), page_number, width, image_format, limits)
        conn.send(("ok", image))
    except (DocumentError, PageError) as exc:
        conn.send(("error", exc.error_type, exc.message))
    except MemoryError:
        conn.send(("error", "PageTooLarge", f"page {page_number} ran out of memory while rendering"))
    except Exception as exc:
        conn.send(("error", "RenderError", f"page {page_number} could not be rendered: {exc}"))
    finally:
        conn.close()


def _context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def render_in_child(
    path: Path,
    page_number: int,
    width: int,
    image_format: ImageFormat,
    limits: LimitSettings,
    timeout_s: float,
) -> PageImage:
    """:func:`render_page_image` in a child process that is killed after ``timeout_s``."""
    context = _context()
    parent_conn, child_conn = context.Pipe(duplex=False)
    process = context.Process(
        target=_child_main,
        args=(child_conn, str(path), page_number, width, image_format, limits),
        name="colstream-page-image",
        daemon=True,
    )
    process.start()
    child_conn.close()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PageImageError(
                    "RenderTimeout", f"page {page_number} took longer than {timeout_s:g}s to render"
                )
            ready = wait([parent_conn, process.sentinel], timeout=remaining)
            if parent_conn in ready or parent_conn.poll():
                try:
                    reply = parent_conn.recv()
                except (EOFError, OSError):
                    reply = None
                if reply is not None and reply[0] == "ok":
                    image: PageImage = reply[1]
                    return image
                if reply is not None:
                    raise PageImageError(reply[1], reply[2])
            if process.sentinel in ready and not parent_conn.poll():
                process.join(timeout=1)
                raise PageImageError(
                    "RendererCrashed",
                    f"the renderer died (exit code {process.exitcode}) while rendering page {page_number}",
                )
    finally:
        if process.is_alive():
            process.kill()
        process.join(timeout=5)
        parent_conn.close()
