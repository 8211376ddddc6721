"""Qdrant's write limits, checked by the sink before any upsert (pure logic, no I/O).

Two limits bound what one upsert may carry:

* **Per multivector**: Qdrant refuses a multivector of ``rows x dim`` numbers unless it
  holds fewer than 1,048,576 numbers. At 128 dimensions that is 8,191 tokens; at 2,560
  dimensions only 409, so a page of a few hundred tokens from a wide model breaks it.
* **Per request**: the REST API refuses a body over ``service.max_request_size_mb``
  (32 MiB by default). JSON carries each float as text, up to 24 bytes
  (``-1.2345678901234567e-05,``). Over gRPC Qdrant lifts the message limit (the server
  and qdrant-client both set it unlimited), so there only the multivector limit holds
  and the request budget is ``None``; a float costs 4 bytes there.

A page over either limit is pooled down with the configured pooler (colpali-engine's
hierarchical token pooler) to the largest size that fits; with the pooler off it is
refused as :class:`VectorsTooLarge`, with its numbers, and dead-lettered on its own.
Batches are split so that every request stays under the budget: a batch is never
rejected whole for its size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np

from colstream.infra.vectorstore import PagePoint, PatchGrid, fallback_grid
from colstream.schemas.errors import PipelineError

# Qdrant: a multivector must hold fewer than this many numbers (rows x dim).
QDRANT_MAX_MULTIVECTOR_NUMBERS = 1_048_576
# Qdrant's default service.max_request_size_mb, the REST body limit.
QDRANT_DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
REST_BYTES_PER_NUMBER = 24
GRPC_BYTES_PER_NUMBER = 4
# The point's id, vector names, brackets and the request envelope, beside its payload.
POINT_OVERHEAD_BYTES = 1024
# Budget below the server's limit for what the estimate does not see (HTTP framing).
REQUEST_HEADROOM = 0.05

Transport = Literal["rest", "grpc", "embedded"]
Pooler = Literal["hierarchical", "off"]
T = TypeVar("T")


class VectorsTooLarge(PipelineError):
    """A page's vectors exceed a Qdrant limit and pooling is off (or cannot fit them)."""

    def __init__(self, message: str) -> None:
        super().__init__("VectorsTooLarge", message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,))


@dataclass(frozen=True)
class WriteLimits:
    """What one write to the store may carry, and how the store shapes what it stores.

    ``layout_pooling_factor`` and ``prefetch`` mirror the pages layout: the store pools
    every page by that factor before storing, and with ``prefetch`` also stores a row and
    a column multivector per page, so those are what must fit.
    """

    max_multivector_numbers: int = QDRANT_MAX_MULTIVECTOR_NUMBERS
    max_request_bytes: int | None = QDRANT_DEFAULT_MAX_REQUEST_BYTES
    bytes_per_number: int = REST_BYTES_PER_NUMBER
    pooler: Pooler = "hierarchical"
    layout_pooling_factor: int = 0
    prefetch: bool = False

    @classmethod
    def for_transport(cls, transport: Transport, max_request_bytes: int | None = None, **layout: Any) -> WriteLimits:
        if transport == "rest":
            budget = max_request_bytes or QDRANT_DEFAULT_MAX_REQUEST_BYTES
            return cls(max_request_bytes=budget, bytes_per_number=REST_BYTES_PER_NUMBER, **layout)
        # gRPC (limit lifted by the server) and the in-process Edge store: no request budget.
        return cls(max_request_bytes=max_request_bytes, bytes_per_number=GRPC_BYTES_PER_NUMBER, **layout)

    @property
    def request_budget(self) -> int | None:
        if self.max_request_bytes is None:
            return None
        return int(self.max_request_bytes * (1 - REQUEST_HEADROOM))

    # -- what a page becomes in the store ---------------------------------------------------

    def stored_rows(self, tokens: int, grid: PatchGrid | None) -> list[int]:
        """Rows of each multivector the store writes for a page of ``tokens`` vectors."""
        original = max(1, tokens // self.layout_pooling_factor) if self.layout_pooling_factor > 1 else tokens
        rows = [original]
        if self.prefetch:
            g = grid if grid is not None and grid.stop <= tokens else fallback_grid(tokens)
            others = tokens - g.rows * g.cols
            rows += [others + g.rows, others + g.cols]
        return rows

    def point_bytes(self, tokens: int, dim: int, grid: PatchGrid | None, payload: dict[str, Any] | None) -> int:
        numbers = sum(self.stored_rows(tokens, grid)) * dim
        payload_bytes = len(json.dumps(payload, default=str)) if payload else 0
        return numbers * self.bytes_per_number + payload_bytes + POINT_OVERHEAD_BYTES

    def problems(self, tokens: int, dim: int, grid: PatchGrid | None, payload: dict[str, Any] | None) -> list[str]:
        """Each limit a page of this size breaks, with its numbers; empty when it fits."""
        found = []
        widest = max(self.stored_rows(tokens, grid))
        if widest * dim >= self.max_multivector_numbers:
            found.append(
                f"multivector of {widest} x {dim} = {widest * dim:,} numbers; Qdrant allows fewer than "
                f"{self.max_multivector_numbers:,}"
            )
        budget = self.request_budget
        if budget is not None:
            size = self.point_bytes(tokens, dim, grid, payload)
            if size > budget:
                found.append(
                    f"~{size:,} request bytes for the page alone; the budget is {budget:,} "
                    f"(server limit {self.max_request_bytes:,})"
                )
        return found

    def max_tokens(self, dim: int, payload: dict[str, Any] | None) -> int:
        """The most vectors a page may have (before the layout's own pooling) and still fit."""
        low, high = 0, 1
        while not self.problems(high, dim, None, payload) and high < 1 << 30:
            low, high = high, high * 2
        while high - low > 1:  # problems() grows with tokens: bisect the boundary
            mid = (low + high) // 2
            if self.problems(mid, dim, None, payload):
                high = mid
            else:
                low = mid
        return low


@dataclass(frozen=True)
class FittedPage:
    vectors: np.ndarray
    grid: PatchGrid | None
    pooled_from: int | None = None  # tokens before pooling; None when the page fitted as it was
    factor: int | None = None


Pool = Callable[[np.ndarray, int], np.ndarray]


def fit_page(
    vectors: np.ndarray,
    grid: PatchGrid | None,
    limits: WriteLimits,
    payload: dict[str, Any] | None = None,
    pool: Pool | None = None,
    where: str = "page",
) -> FittedPage:
    """The page as it can be written: unchanged when it fits, else pooled down to fit.

    Raises :class:`VectorsTooLarge` (with the page's numbers) when pooling is off or when
    even one vector cannot fit. ``pool``: the pooler (default colpali-engine's
    hierarchical token pooler), ``pool(vectors, factor)`` keeps at most ``tokens // factor``.
    """
    tokens, dim = int(vectors.shape[0]), int(vectors.shape[1])
    found = limits.problems(tokens, dim, grid, payload)
    if not found:
        return FittedPage(vectors, grid)
    if limits.pooler == "off":
        raise VectorsTooLarge(f"{where}: {'; '.join(found)}; pooling is off (qdrant.oversize_pooler)")
    fits = limits.max_tokens(dim, payload)
    if fits < 1:
        raise VectorsTooLarge(f"{where}: {'; '.join(found)}; not even one {dim}-d vector fits")
    pooler = pool or _hierarchical_pool
    factor = max(2, math.ceil(tokens / fits))
    while True:
        pooled = np.ascontiguousarray(pooler(vectors, factor), dtype=vectors.dtype)
        # Pooled tokens no longer form the page's patch grid.
        if not limits.problems(int(pooled.shape[0]), dim, None, payload):
            return FittedPage(pooled, None, pooled_from=tokens, factor=factor)
        if pooled.shape[0] <= 1:
            raise VectorsTooLarge(f"{where}: {'; '.join(found)}; pooling cannot make it fit")
        factor += 1


def _hierarchical_pool(vectors: np.ndarray, factor: int) -> np.ndarray:
    from colstream.infra.vectorstore import hierarchical_pool

    return hierarchical_pool(vectors, factor)


def split_by_bytes(items: Sequence[T], size_of: Callable[[T], int], budget: int | None) -> Iterator[list[T]]:
    """Consecutive groups whose sizes sum to at most ``budget`` (a lone item over it still
    forms its own group: the per-page check keeps such pages out beforehand)."""
    if budget is None:
        if items:
            yield list(items)
        return
    group: list[T] = []
    used = 0
    for item in items:
        size = size_of(item)
        if group and used + size > budget:
            yield group
            group, used = [], 0
        group.append(item)
        used += size
    if group:
        yield group


def point_size(limits: WriteLimits) -> Callable[[PagePoint], int]:
    def size_of(point: PagePoint) -> int:
        return limits.point_bytes(int(point.vectors.shape[0]), int(point.vectors.shape[1]), point.grid, point.payload())

    return size_of
