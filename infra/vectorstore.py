"""Where the sink keeps pages (one multivector point per page) and per-document records.

One interface, two backends:

* :class:`~colstream.infra.vectorstore_edge.EdgeVectorStore`: Qdrant Edge, in
  process, on-disk shards under ``settings.path``; the default when no URL is set.
  One process at a time may open a shard directory.
* :class:`~colstream.infra.vectorstore_qdrant.QdrantServerVectorStore`: a Qdrant
  server through qdrant-client when ``settings.url`` is set (its local mode serves
  tests only: it ignores datatypes, HNSW and payload indexes).

Point ids are deterministic (uuid5 of document id and page number), so a replay or
a redelivered batch overwrites instead of duplicating, and a new version of a
document overwrites its pages in place; ``delete_document(below_version=...)``
then clears whatever the old version had beyond the new page count.

Storage options (issue 5), fixed when the pages collection is created (a sidecar
records them, and a later mismatch is refused rather than silently mixed):

* ``token_pooling_factor`` f > 1: store the mean of each run of f consecutive
  tokens instead of every token (1/f of the storage and of the scan). Tokens come
  out of the model in row-major patch order, so a run is a strip of neighbouring
  patches. This is 1-D pooling, not colpali-engine's hierarchical clustering and
  not true row/column pooling: the patch grid does not travel on
  ``documents.vectors``.
* ``mean_pooled_prefetch``: keep the full multivector as ``original`` and add
  ``pooled`` (factor f, or :data:`DEFAULT_PREFETCH_POOLING`); search scans
  ``pooled`` first and reranks its candidates on ``original``.

With both off the pages collection has one unnamed multivector, the layout other
ColPali tools expect.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from colstream.infra.settings import QdrantSettings
from colstream.schemas.events import DocumentRecord

DEFAULT_DIM = 128
DEFAULT_PREFETCH_POOLING = 8
# First-stage candidates per requested result when prefetching on pooled vectors.
PREFETCH_CANDIDATES_PER_RESULT = 10
PREFETCH_MIN_CANDIDATES = 100

ORIGINAL_VECTOR = "original"
POOLED_VECTOR = "pooled"

# Fixed namespaces: ids must be identical across processes, restarts and backends.
_PAGE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://colstream/pages")
_RECORD_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://colstream/records")

PAGE_PAYLOAD_KEYS = ("document_id", "version", "page_number", "total_pages", "filename", "blob_uri", "model")


class InvalidVectorsError(ValueError):
    """A page's multivector cannot be stored (wrong shape, NaN or inf)."""


def page_point_id(document_id: str, page_number: int) -> str:
    # JSON keeps the pair unambiguous whatever characters the id holds.
    return str(uuid.uuid5(_PAGE_NAMESPACE, json.dumps([document_id, page_number])))


def record_point_id(document_id: str) -> str:
    return str(uuid.uuid5(_RECORD_NAMESPACE, document_id))


@dataclass(frozen=True)
class PagePoint:
    document_id: str
    version: int
    page_number: int
    total_pages: int
    filename: str | None
    blob_uri: str | None
    model: str
    vectors: np.ndarray  # float16 or float32, [tokens, dim]

    def __post_init__(self) -> None:
        where = f"document {self.document_id!r} page {self.page_number}"
        if self.page_number < 1 or self.total_pages < self.page_number:
            raise ValueError(f"{where}: page_number must be in 1..total_pages ({self.total_pages})")
        vectors = self.vectors
        if not isinstance(vectors, np.ndarray) or vectors.ndim != 2 or vectors.shape[0] == 0:
            shape = getattr(vectors, "shape", None)
            raise InvalidVectorsError(f"{where}: expected a non-empty (tokens, dim) array, got shape {shape}")
        if vectors.dtype not in (np.float16, np.float32):
            raise InvalidVectorsError(f"{where}: vectors must be float16 or float32, got {vectors.dtype}")
        if not np.isfinite(vectors).all():
            bad_rows = int((~np.isfinite(vectors)).any(axis=1).sum())
            # Qdrant would either reject the batch or store garbage that poisons MaxSim.
            raise InvalidVectorsError(
                f"{where}: {bad_rows} of {vectors.shape[0]} token vectors contain NaN or inf"
            )

    @property
    def point_id(self) -> str:
        return page_point_id(self.document_id, self.page_number)

    def payload(self) -> dict[str, Any]:
        return {
            "document_id": self.document_id,
            "version": self.version,
            "page_number": self.page_number,
            "total_pages": self.total_pages,
            "filename": self.filename,
            "blob_uri": self.blob_uri,
            "model": self.model,
        }


@dataclass(frozen=True)
class PagesLayout:
    """How the pages collection is shaped; fixed when it is created and stored beside it.

    * ``pooling_factor`` 0, ``prefetch_vector`` False: one unnamed full multivector.
    * ``pooling_factor`` f, ``prefetch_vector`` False: one unnamed multivector of pooled
      tokens (token pooling: 1/f of the storage and scan cost, some quality lost).
    * ``prefetch_vector`` True: named ``original`` (full) plus ``pooled`` (factor f).
    """

    dim: int
    float16: bool
    pooling_factor: int
    prefetch_vector: bool

    @property
    def named(self) -> bool:
        return self.prefetch_vector

    def stored_vectors(self, vectors: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
        if self.prefetch_vector:
            return {ORIGINAL_VECTOR: vectors, POOLED_VECTOR: pool_tokens(vectors, self.pooling_factor)}
        if self.pooling_factor > 1:
            return pool_tokens(vectors, self.pooling_factor)
        return vectors

    def as_dict(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "float16": self.float16,
            "pooling_factor": self.pooling_factor,
            "prefetch_vector": self.prefetch_vector,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PagesLayout:
        return cls(
            dim=int(data["dim"]),
            float16=bool(data["float16"]),
            pooling_factor=int(data["pooling_factor"]),
            prefetch_vector=bool(data["prefetch_vector"]),
        )

    def check_compatible(self, wanted: PagesLayout, where: str) -> None:
        # Storage precision may differ from today's settings; what is stored may not.
        mine = (self.dim, self.pooling_factor, self.prefetch_vector)
        theirs = (wanted.dim, wanted.pooling_factor, wanted.prefetch_vector)
        if mine != theirs:
            raise RuntimeError(
                f"{where} holds (dim, pooling_factor, prefetch_vector)={mine}; settings ask for {theirs}. "
                "Use another collection name (or directory) and re-index"
            )


def pages_layout(settings: QdrantSettings, dim: int) -> PagesLayout:
    factor = settings.token_pooling_factor if settings.token_pooling_factor > 1 else 0
    if settings.mean_pooled_prefetch and factor == 0:
        factor = DEFAULT_PREFETCH_POOLING
    return PagesLayout(
        dim=dim,
        float16=settings.on_disk_float16,
        pooling_factor=factor,
        prefetch_vector=settings.mean_pooled_prefetch,
    )


def pool_tokens(vectors: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each run of ``factor`` consecutive token vectors (the last run may be shorter).

    Vectors are L2-normalised first so every token weighs the same in the mean, as
    cosine MaxSim treats them.
    """
    as_float = vectors.astype(np.float32)
    norms = np.linalg.norm(as_float, axis=1, keepdims=True)
    unit = np.divide(as_float, norms, out=np.zeros_like(as_float), where=norms > 0)
    starts = np.arange(0, unit.shape[0], factor)
    sums = np.add.reduceat(unit, starts, axis=0)
    counts = np.diff(np.append(starts, unit.shape[0])).reshape(-1, 1)
    return (sums / counts).astype(np.float32)


def check_query(query: np.ndarray, dim: int) -> np.ndarray:
    array = np.asarray(query, dtype=np.float32)
    if array.ndim == 1:
        array = array.reshape(1, -1)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] != dim:
        raise InvalidVectorsError(f"query must be (tokens, {dim}), got shape {np.shape(query)}")
    if not np.isfinite(array).all():
        raise InvalidVectorsError("query vectors contain NaN or inf")
    return array


def check_page_dims(points: Sequence[PagePoint], dim: int) -> None:
    for point in points:
        if point.vectors.shape[1] != dim:
            raise InvalidVectorsError(
                f"document {point.document_id!r} page {point.page_number}: vectors have dim "
                f"{point.vectors.shape[1]}, the pages collection holds {dim}"
            )


def record_from_payload(payload: dict[str, Any]) -> DocumentRecord:
    return DocumentRecord.model_validate(payload)


@runtime_checkable
class VectorStore(Protocol):
    def ensure_collections(self, dim: int = DEFAULT_DIM) -> None:
        """Create the pages and records collections and their payload indexes; idempotent."""

    def upsert_pages(self, points: Sequence[PagePoint]) -> None:
        """Write pages; durable when it returns."""

    def delete_document(self, document_id: str, below_version: int | None = None) -> None:
        """Delete every page of a document, or only those with version < below_version."""

    def page_payloads(self, document_id: str | None = None) -> list[dict[str, Any]]: ...

    def count_pages(self, document_id: str | None = None) -> int: ...

    def search(
        self, query: np.ndarray, limit: int = 10, document_id: str | None = None
    ) -> list[tuple[float, dict[str, Any]]]:
        """MaxSim search; (score, page payload), best first."""

    def get_records(self, document_ids: Sequence[str]) -> dict[str, DocumentRecord]: ...

    def put_records(self, records: Sequence[DocumentRecord]) -> None:
        """Write per-document records; durable when it returns."""

    def list_records(self) -> list[DocumentRecord]: ...

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def open_vector_store(settings: QdrantSettings) -> VectorStore:
    """Qdrant server when a URL is configured, otherwise the embedded Edge shards."""
    if settings.url:
        from colstream.infra.vectorstore_qdrant import QdrantServerVectorStore

        return QdrantServerVectorStore(settings)
    from colstream.infra.vectorstore_edge import EdgeVectorStore

    return EdgeVectorStore(settings)
