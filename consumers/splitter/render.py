"""Turning a document file into page images at the size the model consumes.

Pure: no Kafka, no blob store, no processes. :mod:`.workers` runs this code in
worker processes, because PDFium is not thread-safe and a hostile file may hang
or crash the renderer.

Rules that matter downstream:

* The kind of a file is decided by its bytes, never by its name or declared type.
* Refusals are :class:`DocumentError` (nothing of the document can be indexed) or
  :class:`PageError` (one page fails, the others go on). Both carry an
  ``error_type`` a program can branch on and a message a person can act on.
* Page images are rendered once, at the size the model will consume and no
  larger: re-rendering or downscaling later costs more than rendering itself.
* An image is one page, except a TIFF, where every frame is a page (multi-page
  scans). Animated GIF/WebP index their first frame only.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image, ImageOps

from colstream.infra.settings import LimitSettings
from colstream.schemas.errors import PipelineError

DocumentKind = Literal["pdf", "image"]

JPEG_QUALITY = 90
# Baseline JPEG cannot store a side longer than 65,535 px.
JPEG_MAX_SIDE = 65_500
# PDF allows junk before the header; PDFium looks this far for it.
PDF_HEADER_WINDOW = 1024
# How many bytes sniff_kind wants to see.
SNIFF_BYTES = PDF_HEADER_WINDOW + 8


class RenderTargetLike(Protocol):
    """The size a model consumes (see ``colstream.embedding.profile.RenderTarget``).

    ``max_pixels``: w*h must not exceed it (ColQwen2). ``min_side``: the shorter
    side the model wants (ColPali). ``max_side``: the longer side must not exceed it.
    """

    @property
    def max_pixels(self) -> int | None: ...

    @property
    def min_side(self) -> int | None: ...

    @property
    def max_side(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class PlainTarget:
    """A picklable snapshot of any :class:`RenderTargetLike`, shipped to worker processes."""

    max_pixels: int | None = None
    min_side: int | None = None
    max_side: int | None = None

    @classmethod
    def of(cls, target: RenderTargetLike) -> PlainTarget:
        return cls(target.max_pixels, target.min_side, target.max_side)


class DocumentError(PipelineError):
    """Nothing of this document can be indexed. ``error_type`` is stable; the message is for people."""

    def __str__(self) -> str:
        return f"{self.error_type}: {self.message}"


class PageError(PipelineError):
    """One page cannot be indexed; the rest of its document goes on."""

    def __str__(self) -> str:
        return f"{self.error_type}: {self.message}"


@dataclass(frozen=True, slots=True)
class DocumentInfo:
    kind: DocumentKind
    page_count: int


@dataclass(frozen=True, slots=True)
class RenderedPage:
    page_number: int
    width: int
    height: int
    image_format: Literal["jpeg"]
    data: bytes


@dataclass(frozen=True, slots=True)
class PageFailure:
    page_number: int
    error_type: str
    message: str


# ---------------------------------------------------------------------------
# What is this file?

_PNG = b"\x89PNG\r\n\x1a\n"
_BMP_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}


def _looks_like_bmp(head: bytes) -> bool:
    # "BM" alone is too weak (any text starting "BM..."): check the DIB header size too.
    return len(head) >= 18 and head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES


def _image_format_of(head: bytes) -> str | None:
    if head.startswith(_PNG):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if _looks_like_bmp(head):
        return "BMP"
    return None


def _describe_unknown(head: bytes) -> str:
    stripped = head.lstrip()[:64].lower()
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive (Office documents are ZIP files too)"
    if stripped.startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    if stripped.startswith(b"<?xml") or stripped.startswith(b"<svg"):
        return "an XML/SVG file"
    if head.startswith(b"%!PS"):
        return "a PostScript file"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "a HEIC/AVIF image"
    return "an unrecognised format"


SUPPORTED_FORMATS_HINT = (
    "upload a PDF, a PNG, JPEG, TIFF, WebP, BMP or GIF image, or an Office (DOCX, DOC, ODT, RTF, "
    "PPTX, PPT, ODP, XLSX, XLS, ODS), HTML, text or Markdown document"
)


def sniff_kind(head: bytes, content_type: str | None = None, filename: str | None = None) -> DocumentKind:
    """Decide pdf/image from the first bytes (pass at least :data:`SNIFF_BYTES`).

    ``content_type`` and ``filename`` only colour the error message: a sender's
    label is a claim, the bytes are the fact.
    """
    if not head:
        raise DocumentError("EmptyFile", "the file is empty (0 bytes); upload it again")
    if b"%PDF-" in head[:PDF_HEADER_WINDOW]:
        return "pdf"
    if _image_format_of(head) is not None:
        return "image"
    labels = ", ".join(repr(v) for v in (filename, content_type) if v)
    claimed = f" although it is labelled {labels}" if labels else ""
    raise DocumentError(
        "UnsupportedFormat", f"the content is {_describe_unknown(head)}{claimed}; {SUPPORTED_FORMATS_HINT}"
    )


# ---------------------------------------------------------------------------
# How big should a page be?


def fit_size(width: float, height: float, target: RenderTargetLike, *, upscale: bool) -> tuple[int, int]:
    """Pixel size for a ``width`` x ``height`` source so that the model gets what it consumes, no more.

    ``max_pixels`` and ``max_side`` are hard caps. ``min_side`` is what the model
    wants for the shorter side: it sets the size when there is no cap and is a
    floor otherwise (caps win). Without ``upscale`` (raster images) a source is
    only ever made smaller: enlarging pixels adds bytes, not information. A
    target without any bound keeps the source size (72 dpi for PDF). The result
    never exceeds JPEG's side limit.
    """
    if width <= 0 or height <= 0 or not (math.isfinite(width) and math.isfinite(height)):
        raise ValueError(f"bad source size {width}x{height}")
    caps = []
    if target.max_pixels:
        caps.append(math.sqrt(target.max_pixels / (width * height)))
    if target.max_side:
        caps.append(target.max_side / max(width, height))
    floor = target.min_side / min(width, height) if target.min_side else None

    scale = min(caps) if caps else (floor if floor is not None else 1.0)
    if floor is not None and caps:
        scale = min(max(scale, floor), *caps)
    if not upscale:
        scale = min(scale, 1.0)
    scale = min(scale, JPEG_MAX_SIDE / max(width, height))

    # The epsilon absorbs float error (447.9999 must be 448); the loop restores the cap it may break.
    out_w = max(1, math.floor(width * scale + 1e-6))
    out_h = max(1, math.floor(height * scale + 1e-6))
    while target.max_pixels and out_w * out_h > target.max_pixels and max(out_w, out_h) > 1:
        if out_w >= out_h:
            out_w -= 1
        else:
            out_h -= 1
    return out_w, out_h


# Vision processors refuse extreme strips (Qwen2-VL: aspect ratio below 200), so a
# banner or a receipt roll is centred on a white canvas no narrower than 1:100.
MAX_ASPECT_RATIO = 100


def pad_extreme_aspect(image: Image.Image, max_ratio: int = MAX_ASPECT_RATIO) -> Image.Image:
    w, h = image.size
    if max(w, h) <= max_ratio * min(w, h):
        return image
    canvas_size = (w, -(-w // max_ratio)) if w >= h else (-(-h // max_ratio), h)
    canvas = Image.new("RGB", canvas_size, (255, 255, 255))
    canvas.paste(image, ((canvas_size[0] - w) // 2, (canvas_size[1] - h) // 2))
    return canvas


def encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


# ---------------------------------------------------------------------------
# Opening and rendering


class DocumentSession(Protocol):
    """An opened document: render many pages from one open (workers open once per chunk)."""

    kind: DocumentKind
    page_count: int

    def render(self, page_number: int, target: RenderTargetLike) -> RenderedPage: ...

    def close(self) -> None: ...


def _check_file(path: Path, limits: LimitSettings) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DocumentError("MissingFile", f"the file {path.name!r} is not there any more") from None
    if size == 0:
        raise DocumentError("EmptyFile", "the file is empty (0 bytes); upload it again")
    if size > limits.max_blob_bytes:
        raise DocumentError(
            "BlobTooLarge",
            f"the file is {size:,} bytes, above the {limits.max_blob_bytes:,}-byte limit; "
            "split it or raise COLSTREAM_LIMITS__MAX_BLOB_BYTES",
        )


def _check_page_count(count: int, limits: LimitSettings) -> None:
    if count > limits.max_pages:
        raise DocumentError(
            "TooManyPages",
            f"the document has {count:,} pages, above the {limits.max_pages:,}-page limit; "
            "split it or raise COLSTREAM_LIMITS__MAX_PAGES",
        )


class PdfSession:
    kind: DocumentKind = "pdf"

    def __init__(self, path: Path, limits: LimitSettings) -> None:
        self._limits = limits
        # Loaded through the raw API: pypdfium2's constructor refuses a zero-page document
        # without saying so. No password: PDFium still opens owner-password-only files.
        raw = pdfium_c.FPDF_LoadDocument(str(path).encode("utf-8", "surrogateescape") + b"\0", None)
        if not raw:
            raise _pdf_open_error(pdfium_c.FPDF_GetLastError())
        self._pdf = pdfium.PdfDocument(raw)
        try:
            # Before any page is loaded (pypdfium2's rule), so filled-in form fields get drawn.
            # This PDFium build has no JavaScript engine: scripts in the file never run.
            self._pdf.init_forms()
            self.page_count = len(self._pdf)
        except pdfium.PdfiumError as exc:
            self._pdf.close()
            raise DocumentError("BrokenDocument", f"the PDF could not be read: {exc}") from None

    def render(self, page_number: int, target: RenderTargetLike) -> RenderedPage:
        if not 1 <= page_number <= self.page_count:
            raise PageError("NoSuchPage", f"page {page_number} is outside 1..{self.page_count}")
        try:
            page = self._pdf[page_number - 1]
        except pdfium.PdfiumError:
            raise PageError(
                "BrokenPage", f"page {page_number} is missing or damaged in the file and cannot be loaded"
            ) from None
        try:
            width_pt, height_pt = page.get_size()  # already swapped for /Rotate 90/270
            try:
                out_w, out_h = fit_size(width_pt, height_pt, target, upscale=True)
            except ValueError:
                raise PageError(
                    "BrokenPage", f"page {page_number} has an unusable size {width_pt}x{height_pt} pt"
                ) from None
            if out_w * out_h > self._limits.max_pixels_per_page:
                raise PageError(
                    "PageTooLarge",
                    f"page {page_number} ({width_pt:.0f}x{height_pt:.0f} pt) would render to {out_w}x{out_h} px, "
                    f"above the {self._limits.max_pixels_per_page:,}-pixel page limit",
                )
            # pypdfium2 sizes the bitmap as ceil(side * scale): shave a hair so it lands on out_w x out_h.
            scale = min(out_w / width_pt, out_h / height_pt) * (1 - 1e-9)
            try:
                bitmap = page.render(scale=scale, rev_byteorder=True, may_draw_forms=True)
            except MemoryError:
                raise PageError("PageTooLarge", f"page {page_number} did not fit in memory to render") from None
            except pdfium.PdfiumError as exc:
                raise PageError("BrokenPage", f"page {page_number} could not be rendered: {exc}") from None
            try:
                image = bitmap.to_pil()
                if image.mode != "RGB":
                    image = image.convert("RGB")
                image = pad_extreme_aspect(image)
                data = encode_jpeg(image)
                width, height = image.size
            finally:
                bitmap.close()
        finally:
            page.close()
        return RenderedPage(page_number, width, height, "jpeg", data)

    def close(self) -> None:
        self._pdf.close()


def _pdf_open_error(code: int) -> DocumentError:
    if code == pdfium_c.FPDF_ERR_PASSWORD:
        return DocumentError(
            "EncryptedDocument",
            "the PDF is protected by a password needed to open it; upload a copy without the open password",
        )
    if code == pdfium_c.FPDF_ERR_SECURITY:
        return DocumentError(
            "EncryptedDocument",
            "the PDF uses an unsupported encryption or DRM scheme; upload an unprotected copy",
        )
    if code == pdfium_c.FPDF_ERR_FILE:
        return DocumentError("MissingFile", "the file could not be read from local storage")
    return DocumentError(
        "BrokenDocument",
        "the PDF is damaged (truncated, or its structure is unreadable) and could not be opened; "
        "re-export or re-upload it",
    )


class ImageSession:
    kind: DocumentKind = "image"

    def __init__(self, path: Path, limits: LimitSettings) -> None:
        self._limits = limits
        self._image = _open_image(path, limits)
        self._format = self._image.format or "?"
        try:
            # Only TIFF frames are pages; an animated GIF or WebP is one picture.
            self.page_count = int(getattr(self._image, "n_frames", 1)) if self._format == "TIFF" else 1
        except Exception as exc:
            self._image.close()
            raise DocumentError("BrokenImage", f"the TIFF's frame list is damaged: {exc}") from None

    def render(self, page_number: int, target: RenderTargetLike) -> RenderedPage:
        if not 1 <= page_number <= self.page_count:
            raise PageError("NoSuchPage", f"page {page_number} is outside 1..{self.page_count}")
        image = self._image
        try:
            if self.page_count > 1 or page_number > 1:
                image.seek(page_number - 1)
        except Exception as exc:
            raise PageError("BrokenImage", f"frame {page_number} cannot be read: {exc}") from None
        src_w, src_h = image.size
        if src_w * src_h > self._limits.max_image_pixels:
            raise PageError("ImageTooLarge", _too_many_pixels(src_w, src_h, self._limits))
        orientation = _exif_orientation(image)
        swapped = orientation in (5, 6, 7, 8)
        upright_w, upright_h = (src_h, src_w) if swapped else (src_w, src_h)
        out_w, out_h = fit_size(upright_w, upright_h, target, upscale=False)
        if out_w * out_h > self._limits.max_pixels_per_page:
            raise PageError(
                "PageTooLarge",
                f"image {page_number} would become {out_w}x{out_h} px, "
                f"above the {self._limits.max_pixels_per_page:,}-pixel page limit",
            )
        try:
            if image.format == "JPEG":
                # Decode at a reduced DCT scale when the target is much smaller: less memory, less time.
                image.draft(None, (out_h, out_w) if swapped else (out_w, out_h))
            image.load()
            rgb = to_rgb(image)
            if orientation != 1:
                rgb = ImageOps.exif_transpose(rgb) or rgb
            if rgb.size != (out_w, out_h):
                rgb = rgb.resize((out_w, out_h), Image.Resampling.LANCZOS)
            rgb = pad_extreme_aspect(rgb)
            data = encode_jpeg(rgb)
        except (PageError, DocumentError):
            raise
        except Exception as exc:
            raise PageError(
                "BrokenImage", f"image {page_number} is damaged or truncated and cannot be decoded: {exc}"
            ) from None
        return RenderedPage(page_number, rgb.width, rgb.height, "jpeg", data)

    def close(self) -> None:
        self._image.close()


def _too_many_pixels(width: int, height: int, limits: LimitSettings) -> str:
    return (
        f"the image claims {width}x{height} = {width * height:,} pixels, above the "
        f"{limits.max_image_pixels:,}-pixel limit (decompression-bomb guard); downscale it before uploading"
    )


def _open_image(path: Path, limits: LimitSettings) -> Image.Image:
    with warnings.catch_warnings():
        # Our own limit decides; Pillow's warning threshold is a different number.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)  # reads the header only: nothing is decoded yet
        except Image.DecompressionBombError as exc:
            raise DocumentError("ImageTooLarge", f"{exc}; downscale it before uploading") from None
        except Exception as exc:
            raise DocumentError("BrokenImage", f"the image header cannot be read: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        image.close()
        raise DocumentError("BrokenImage", f"the image claims an impossible size {width}x{height}")
    if width * height > limits.max_image_pixels:
        image.close()
        raise DocumentError("ImageTooLarge", _too_many_pixels(width, height, limits))
    return image


def _exif_orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(0x0112, 1)
        return int(value) if value in range(1, 9) else 1
    except Exception:
        return 1  # a broken EXIF block must not cost the page


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB whatever came in: CMYK, 16/32-bit, float, palette, alpha (flattened on white), bilevel."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            scaled = values / 257.0  # full 16-bit range onto 8 bits
        else:
            low, high = float(values.min()), float(values.max())
            scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        return Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_session(path: Path, kind: DocumentKind, limits: LimitSettings) -> DocumentSession:
    """Open and validate; raises :class:`DocumentError`. The caller closes the session."""
    _check_file(path, limits)
    session: DocumentSession = PdfSession(path, limits) if kind == "pdf" else ImageSession(path, limits)
    try:
        if session.page_count < 1:
            raise DocumentError("ZeroPages", "the document has no pages; there is nothing to index")
        _check_page_count(session.page_count, limits)
    except DocumentError:
        session.close()
        raise
    return session


@contextmanager
def opened(path: Path, kind: DocumentKind, limits: LimitSettings) -> Iterator[DocumentSession]:
    session = open_session(path, kind, limits)
    try:
        yield session
    finally:
        session.close()


def open_document(path: Path, kind: DocumentKind, limits: LimitSettings) -> DocumentInfo:
    """Validate a document and count its pages; raises :class:`DocumentError`."""
    with opened(path, kind, limits) as session:
        return DocumentInfo(kind, session.page_count)


def render_page(
    path: Path, kind: DocumentKind, page_number: int, target: RenderTargetLike, limits: LimitSettings
) -> RenderedPage:
    """Render one page (1-based). Raises :class:`DocumentError` or :class:`PageError`."""
    with opened(path, kind, limits) as session:
        return session.render(page_number, target)


def read_head(path: Path) -> bytes:
    with path.open("rb") as handle:
        return handle.read(SNIFF_BYTES)
