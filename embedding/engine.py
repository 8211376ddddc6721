"""The production embedding engine: three stages joined by bounded queues.

    submit() --> [preprocess: CPU thread pool] --q--> [forward: device thread] --q--> [postprocess thread]

* Preprocess decodes image bytes, buckets pages of a similar token count together
  (less padding, and so fewer wasted FLOPs), runs the processor and pins the host
  tensors so the device copy can overlap compute.
* Forward is the only thread that launches work on the device. On CUDA out-of-memory
  it splits the batch in half, retries, and remembers the smaller size as safe.
* Postprocess waits for the device-to-host copy, drops padded rows and hands back
  float16 arrays, so the device thread is already running the next batch.

The queues are bounded (``queue_depth``): when the device is the bottleneck,
preprocessing stalls instead of piling up decoded pages in memory.

A page that cannot be decoded or processed yields an error result for that page
only. A failure of the model itself (anything but an OOM that splitting fixes)
fails the whole submitted group: that is not the page's fault, and the caller
should retry rather than dead-letter good pages.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from colstream.embedding.model import EmbeddingModel, ImageGrid, ModelInputs
from colstream.infra.metrics import StageMetrics
from colstream.infra.settings import LimitSettings

# colstream_embed_forward_seconds, one observation per forward pass on the device.
_FORWARD_METRICS = StageMetrics("embedder")

log = logging.getLogger(__name__)

_STOP = object()


class PageModel(Protocol):
    """What the engine needs of a model: :class:`EmbeddingModel`, or a stand-in in tests
    (:class:`colstream.testing.DummyPageModel`)."""

    device: torch.device

    def visual_token_estimate(self, width: int, height: int) -> int: ...

    def preprocess_images(self, images: Sequence[Image.Image]) -> ModelInputs: ...

    def forward(self, inputs: ModelInputs) -> torch.Tensor: ...

    def image_grids(self, inputs: ModelInputs) -> list[ImageGrid | None]: ...


@dataclass(frozen=True)
class EmbedItem:
    key: Any
    image_bytes: bytes


@dataclass(frozen=True)
class EmbedResult:
    key: Any
    vectors: np.ndarray | None  # float16 [real_tokens, dim]
    error: str | None = None
    error_type: str | None = None
    # Where the image tokens sit in ``vectors`` (for row/column pooling); None if unknown.
    grid: ImageGrid | None = None

    @property
    def ok(self) -> bool:
        return self.vectors is not None


class ImageTooLargeError(ValueError):
    pass


@dataclass
class EngineStats:
    batches: int = 0
    items: int = 0
    oom_splits: int = 0
    forward_seconds: float = 0.0


class _Group:
    """One submit() call: resolves its future once every item has a result."""

    def __init__(self, keys: list[Any]) -> None:
        self.keys = keys
        self.future: Future[list[EmbedResult]] = Future()
        self._results: list[EmbedResult | None] = [None] * len(keys)
        self._remaining = len(keys)
        self._lock = threading.Lock()
        if not keys:
            self.future.set_result([])

    def resolve(self, index: int, result: EmbedResult) -> None:
        with self._lock:
            if self.future.done() or self._results[index] is not None:
                return
            self._results[index] = result
            self._remaining -= 1
            done = self._remaining == 0
        if done:
            self.future.set_result([r for r in self._results if r is not None])

    def fail_item(self, index: int, exc: BaseException) -> None:
        self.resolve(
            index, EmbedResult(self.keys[index], None, error=str(exc) or repr(exc), error_type=type(exc).__name__)
        )

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.future.done():
                return
            self.future.set_exception(exc)


@dataclass
class _Batch:
    group: _Group
    indices: list[int]
    inputs: ModelInputs


@dataclass
class _Forwarded:
    group: _Group
    indices: list[int]
    outputs: torch.Tensor  # host tensor once `ready` has fired
    attention_mask: torch.Tensor
    ready: Any = None  # torch.cuda.Event for the device-to-host copy, None on CPU
    inputs: ModelInputs | None = None  # host inputs, to read each page's image grid from


@dataclass
class PipelinedEmbedder:
    model: PageModel
    max_batch_size: int
    queue_depth: int = 2
    preprocess_workers: int = 2
    # Decompression bombs: refuse before decoding. Stages pass LimitSettings.max_image_pixels.
    max_image_pixels: int | None = field(default_factory=lambda: LimitSettings().max_image_pixels)
    stats: EngineStats = field(default_factory=EngineStats)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._safe_batch_size = self.max_batch_size
        self._on_cuda = self.model.device.type == "cuda"
        self._forward_queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, self.queue_depth))
        self._post_queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, self.queue_depth))
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.preprocess_workers), thread_name_prefix="embed-pre")
        self._closed = False
        self._close_lock = threading.Lock()
        self._device_thread = threading.Thread(target=self._device_loop, name="embed-device", daemon=True)
        self._post_thread = threading.Thread(target=self._post_loop, name="embed-post", daemon=True)
        self._device_thread.start()
        self._post_thread.start()

    @property
    def safe_batch_size(self) -> int:
        """Largest batch size known not to run out of device memory."""
        return self._safe_batch_size

    # -- public API --------------------------------------------------------------

    def submit(self, items: Sequence[EmbedItem]) -> Future[list[EmbedResult]]:
        """Embed ``items``; the future holds one result per item, in input order."""
        if self._closed:
            raise RuntimeError("PipelinedEmbedder is closed")
        group = _Group([item.key for item in items])
        if not items:
            return group.future
        # Header-only parse (no pixel decoding) to learn each page's size, so pages of
        # a similar token count share a batch.
        sized: list[tuple[int, int]] = []
        for index, item in enumerate(items):
            try:
                width, height = self._peek_size(item.image_bytes)
            except Exception as exc:
                group.fail_item(index, exc)
                continue
            sized.append((self.model.visual_token_estimate(width, height), index))
        sized.sort()
        batch_size = self._safe_batch_size
        for start in range(0, len(sized), batch_size):
            indices = [index for _, index in sized[start : start + batch_size]]
            chunk = [items[i] for i in indices]
            self._pool.submit(self._preprocess, group, indices, chunk)
        return group.future

    def embed_sync(self, items: Sequence[EmbedItem]) -> list[EmbedResult]:
        return self.submit(items).result()

    def close(self) -> None:
        """Finish everything submitted so far, then stop the threads."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True)
        self._forward_queue.put(_STOP)
        self._device_thread.join()
        self._post_thread.join()

    def __enter__(self) -> PipelinedEmbedder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- stage 1: preprocess (thread pool) -------------------------------------

    def _peek_size(self, data: bytes) -> tuple[int, int]:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        if self.max_image_pixels is not None and width * height > self.max_image_pixels:
            raise ImageTooLargeError(
                f"image is {width}x{height} = {width * height} pixels, above the limit of {self.max_image_pixels}"
            )
        return width, height

    @staticmethod
    def _decode(data: bytes) -> Image.Image:
        image = Image.open(io.BytesIO(data))
        image.load()  # force full decoding now: truncated files fail here, not in the processor
        return image.convert("RGB")

    def _preprocess(self, group: _Group, indices: list[int], items: list[EmbedItem]) -> None:
        try:
            images: list[Image.Image] = []
            kept: list[int] = []
            for index, item in zip(indices, items, strict=True):
                try:
                    images.append(self._decode(item.image_bytes))
                    kept.append(index)
                except Exception as exc:
                    group.fail_item(index, exc)
            if not images:
                return
            for batch_indices, inputs in self._process(group, kept, images):
                if self._on_cuda:
                    inputs = inputs.pin_memory()
                self._forward_queue.put(_Batch(group, batch_indices, inputs))
        except BaseException as exc:  # never lose a group silently
            log.exception("preprocessing failed")
            group.fail(exc)

    def _process(
        self, group: _Group, indices: list[int], images: list[Image.Image]
    ) -> list[tuple[list[int], ModelInputs]]:
        try:
            return [(indices, self.model.preprocess_images(images))]
        except Exception:
            if len(images) == 1:
                raise
        # One page broke the processor (e.g. an extreme aspect ratio): find it by
        # processing pages one by one, and keep the good ones as a batch.
        good_indices: list[int] = []
        good_images: list[Image.Image] = []
        for index, image in zip(indices, images, strict=True):
            try:
                self.model.preprocess_images([image])
            except Exception as exc:
                group.fail_item(index, exc)
                continue
            good_indices.append(index)
            good_images.append(image)
        if not good_images:
            return []
        return [(good_indices, self.model.preprocess_images(good_images))]

    # -- stage 2: forward (device thread) -----------------------------------------

    def _device_loop(self) -> None:
        while True:
            batch = self._forward_queue.get()
            if batch is _STOP:
                self._post_queue.put(_STOP)
                return
            if batch.group.future.done():
                continue  # the group already failed: do not spend device time on it
            try:
                started = time.perf_counter()
                for start, stop, outputs in self._forward_splitting_on_oom(batch.inputs, 0):
                    part = batch.inputs.slice(start, stop) if (start, stop) != (0, batch.inputs.size) else batch.inputs
                    self._post_queue.put(self._to_host(batch, batch.indices[start:stop], outputs, part))
                elapsed = time.perf_counter() - started
                self.stats.forward_seconds += elapsed
                _FORWARD_METRICS.embed_forward(elapsed)
                self.stats.batches += 1
                self.stats.items += batch.inputs.size
            except BaseException as exc:
                log.exception("forward failed for a batch of %d", batch.inputs.size)
                batch.group.fail(exc)

    def _forward_splitting_on_oom(self, inputs: ModelInputs, offset: int) -> list[tuple[int, int, torch.Tensor]]:
        try:
            return [(offset, offset + inputs.size, self.model.forward(inputs))]
        except torch.cuda.OutOfMemoryError:
            if inputs.size <= 1:
                raise
        torch.cuda.empty_cache()
        half = inputs.size // 2
        self.stats.oom_splits += 1
        if half < self._safe_batch_size:
            log.warning("CUDA out of memory at batch size %d; retrying as %d", inputs.size, half)
            self._safe_batch_size = half
        return self._forward_splitting_on_oom(inputs.slice(0, half), offset) + self._forward_splitting_on_oom(
            inputs.slice(half, inputs.size), offset + half
        )

    def _to_host(self, batch: _Batch, indices: list[int], outputs: torch.Tensor, part: ModelInputs) -> _Forwarded:
        mask = part.tensors["attention_mask"]
        if not self._on_cuda:
            return _Forwarded(batch.group, indices, outputs, mask, inputs=part)
        # Start the copy now, wait for it on the postprocess thread: the device thread
        # goes straight on to launch the next batch.
        device_half = outputs.to(torch.float16)
        host = torch.empty(device_half.shape, dtype=torch.float16, pin_memory=True)
        host.copy_(device_half, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _Forwarded(batch.group, indices, host, mask, ready, inputs=part)

    # -- stage 3: postprocess ----------------------------------------------------

    def _post_loop(self) -> None:
        while True:
            item = self._post_queue.get()
            if item is _STOP:
                return
            try:
                if item.ready is not None:
                    item.ready.synchronize()
                vectors = EmbeddingModel.postprocess(item.outputs, item.attention_mask, np.float16)
                grids = self.model.image_grids(item.inputs) if item.inputs is not None else [None] * len(vectors)
                # What the vectors may contain is checked once, where they become a
                # message (PageVectors.from_array): NaN/inf pages fail there.
                for index, page_vectors, grid in zip(item.indices, vectors, grids, strict=True):
                    item.group.resolve(index, EmbedResult(item.group.keys[index], page_vectors, grid=grid))
            except BaseException as exc:
                log.exception("postprocessing failed")
                item.group.fail(exc)
