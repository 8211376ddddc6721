"""Images sent to ``/embed`` and ``/embed_batch``, decoded in bounded memory.

A 97 KB PNG can declare 9999x9999 pixels: decoding it takes 300 MB as RGB, more
on the way, and a few in parallel exhaust the server. So, in order:

1. the request body is refused by size before it is parsed (``Content-Length``,
   then counted while it streams: :func:`embed_body_limits` feeds
   :class:`colstream.api.limits.LimitRequestBody`, the one body-size guard);
2. each image's dimensions are read from its header, nothing decoded. JPEGs are
   asked to decode at a reduced DCT scale (``Image.draft``), so their pixel count
   is the reduced one; an image above ``max_embed_image_pixels`` is refused (413);
3. all images of one request together must fit ``max_embed_request_pixels``
   (413 naming the total), checked before the first one is decoded;
4. at most ``max_concurrent_decodes`` decodes run at once in the process (a
   semaphore; the others wait), so N parallel requests never hold N full images;
5. a decoded image larger than the model needs is reduced at once
   (``Image.reduce``, an integer box filter) to at most ``embed_decode_max_pixels``
   before it is converted to RGB or queued for the model.

The numbers live in :class:`colstream.infra.settings.LimitSettings`; the model's
processor resizes again to its own input size, so nothing of the embedding's
quality depends on pixels above ``embed_decode_max_pixels``.
"""

from __future__ import annotations

import io
import math
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image
from starlette.types import ASGIApp, Receive, Scope, Send

from colstream.api.content import ALLOWED_IMAGE_FORMATS, RejectedInput, decode_base64
from colstream.api.limits import LimitRequestBody
from colstream.infra.settings import LimitSettings

EMBED_PATHS = ("/embed", "/embed_batch", "/embed/query", "/search")


def embed_body_limits(limits: LimitSettings) -> dict[str, int]:
    """Body-size limits per path for the JSON routes that carry images or queries."""
    return {path: limits.max_embed_body_bytes for path in EMBED_PATHS}


class LimitBodyPerPath:
    """:class:`LimitRequestBody` with a tighter limit on some paths (exact match)."""

    def __init__(self, app: ASGIApp, limits: dict[str, int]) -> None:
        self.app = app
        self.guarded = {path: LimitRequestBody(app, max_bytes=limit) for path, limit in limits.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guard = self.guarded.get(scope.get("path", "")) if scope["type"] == "http" else None
        await (guard or self.app)(scope, receive, send)


@dataclass
class _Planned:
    raw: bytes
    what: str
    width: int
    height: int
    draft_to: tuple[int, int] | None


class EmbedImageDecoder:
    """Header checks, a per-request pixel budget and bounded concurrent decodes."""

    def __init__(self, limits: LimitSettings) -> None:
        self.limits = limits
        self._slots = threading.BoundedSemaphore(limits.max_concurrent_decodes)

    # -- header only

    def _plan(self, data: str, what: str) -> _Planned:
        raw = decode_base64(data, self.limits.max_embed_body_bytes, what)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(raw))
        except Image.DecompressionBombError as exc:
            raise RejectedInput(413, f"{what}: image too large to decode safely") from exc
        except Exception as exc:
            raise RejectedInput(400, f"{what}: not a readable image ({type(exc).__name__})") from exc
        with image:
            if image.format not in ALLOWED_IMAGE_FORMATS:
                expected = ", ".join(sorted(ALLOWED_IMAGE_FORMATS))
                raise RejectedInput(400, f"{what}: unsupported image format {image.format}; expected one of {expected}")
            width, height = image.size
            draft_to: tuple[int, int] | None = None
            if image.format == "JPEG" and width * height > self.limits.embed_decode_max_pixels:
                factor = math.sqrt(width * height / self.limits.embed_decode_max_pixels)
                draft_to = (max(1, int(width / factor)), max(1, int(height / factor)))
                # draft picks the smallest DCT scale (1/2, 1/4, 1/8) still at least this size.
                image.draft("RGB", draft_to)
                width, height = image.size
        if width * height > self.limits.max_embed_image_pixels:
            raise RejectedInput(
                413,
                f"{what}: image is {width}x{height} = {width * height} pixels; the limit is "
                f"{self.limits.max_embed_image_pixels} (downscale it before sending)",
            )
        return _Planned(raw, what, width, height, draft_to)

    def plan(self, items: Sequence[tuple[str, str]]) -> list[_Planned]:
        planned = [self._plan(data, what) for data, what in items]
        total = sum(p.width * p.height for p in planned)
        if total > self.limits.max_embed_request_pixels:
            raise RejectedInput(
                413,
                f"the request's images hold {total} pixels together; the limit is "
                f"{self.limits.max_embed_request_pixels} per request",
            )
        return planned

    # -- decoding

    def _decode(self, item: _Planned) -> Image.Image:
        with self._slots:
            try:
                with Image.open(io.BytesIO(item.raw)) as image:
                    if item.draft_to is not None:
                        image.draft("RGB", item.draft_to)
                    image.load()
                    pixels = image.width * image.height
                    factor = math.ceil(math.sqrt(pixels / self.limits.embed_decode_max_pixels))
                    try:
                        reduced = image.reduce(factor) if factor > 1 else image
                    except ValueError:  # a mode reduce() does not take (palette, 1-bit)
                        reduced = image.convert("RGB").reduce(factor)
                    try:
                        return reduced.convert("RGB")
                    finally:
                        if reduced is not image:
                            reduced.close()
            except RejectedInput:
                raise
            except Exception as exc:
                raise RejectedInput(400, f"{item.what}: cannot decode image ({type(exc).__name__}: {exc})") from exc

    def decode_all(self, items: Sequence[tuple[str, str]]) -> list[Image.Image]:
        """``(base64 data, name for errors)`` pairs -> RGB images, or RejectedInput."""
        planned = self.plan(items)
        return [self._decode(item) for item in planned]

    def decode(self, data: str, what: str = "image") -> Image.Image:
        (image,) = self.decode_all([(data, what)])
        return image
