"""Checks on what clients send, before anything reaches a topic or the model.

Pure functions over bytes and files: each raises :class:`RejectedInput` carrying
the HTTP status a client should see (400 malformed, 413 too large, 415 wrong
type), so the routes stay thin and the rules are testable without a server.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import unicodedata
import warnings
from pathlib import Path

from PIL import Image

PDF_MAGIC = b"%PDF-"
# Readers tolerate junk before the header within the first KiB (PDF 1.7, annex H).
PDF_HEADER_WINDOW = 1024

# What the original /ingest/image accepted (PNG, JPG, JPEG, BMP, TIFF, WEBP), plus GIF
# and MPO (what many phone cameras write under a .jpg name).
ALLOWED_IMAGE_FORMATS: dict[str, str] = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "WEBP": "image/webp",
    "GIF": "image/gif",
}

_DATA_URL_PREFIX = re.compile(r"^data:[\w.+-]+/[\w.+-]+;base64,", re.IGNORECASE)
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._ -]+")


class RejectedInput(Exception):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def looks_like_pdf(head: bytes) -> bool:
    return PDF_MAGIC in head[:PDF_HEADER_WINDOW]


def check_pdf_file(path: Path) -> str:
    """Return the content type of a PDF upload, or reject it."""
    with open(path, "rb") as source:
        head = source.read(PDF_HEADER_WINDOW)
    if not head:
        raise RejectedInput(400, "the uploaded file is empty")
    if not looks_like_pdf(head):
        raise RejectedInput(415, "the uploaded file is not a PDF (no %PDF- header); use /ingest/image for images")
    return "application/pdf"


def _open_checked_image(source: str | Path | io.BytesIO, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse decompression bombs before decoding pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
    except Image.DecompressionBombError as exc:
        raise RejectedInput(413, f"image too large to decode safely: {exc}") from exc
    except Exception as exc:
        raise RejectedInput(415, f"not a readable image ({type(exc).__name__}: {exc})") from exc
    if image.format not in ALLOWED_IMAGE_FORMATS:
        image.close()
        expected = ", ".join(sorted(ALLOWED_IMAGE_FORMATS))
        raise RejectedInput(415, f"unsupported image format {image.format}; expected one of {expected}")
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise RejectedInput(413, f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    return image


def check_image_file(path: Path, max_pixels: int) -> str:
    """Return the content type of an image upload, or reject it."""
    if path.stat().st_size == 0:
        raise RejectedInput(400, "the uploaded file is empty")
    image = _open_checked_image(path, max_pixels)
    fmt = image.format or ""
    try:
        # verify() walks the encoded data without keeping pixels: catches truncated files.
        image.verify()
    except Exception as exc:
        raise RejectedInput(415, f"corrupt {fmt} image ({type(exc).__name__}: {exc})") from exc
    finally:
        image.close()
    return ALLOWED_IMAGE_FORMATS[fmt]


def decode_base64(data: str, max_bytes: int, what: str = "image") -> bytes:
    text = _DATA_URL_PREFIX.sub("", data.strip(), count=1)
    # Base64 inflates by 4/3: refuse before decoding something that cannot fit.
    if len(text) > (max_bytes // 3 + 1) * 4 + 4:
        raise RejectedInput(413, f"{what} is larger than the {max_bytes}-byte limit")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RejectedInput(400, f"{what} is not valid base64: {exc}") from exc
    if not raw:
        raise RejectedInput(400, f"{what} is empty")
    return raw


def clean_filename(raw: str | None, fallback: str) -> str:
    """The base name a client sent, without directories or control characters."""
    if not raw:
        return fallback
    base = re.split(r"[\\/]", raw)[-1]
    base = "".join(ch for ch in base if unicodedata.category(ch)[0] != "C").strip()
    if base in ("", ".", ".."):
        return fallback
    return base[:255]


def blob_safe_name(filename: str, fallback: str) -> str:
    """A conservative variant for blob paths (Azure and local file systems alike)."""
    safe = _UNSAFE_NAME_CHARS.sub("_", filename).strip(" .")
    return safe[:200] or fallback
