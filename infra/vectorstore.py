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

Storage options, fixed when the pages collection is created (a sidecar
records them, and a later mismatch is refused rather than silently mixed):

* ``on_disk_float16``: store float16 instead of float32 (half the bytes; the model's
  output is float16 already, so nothing is lost).
* ``token_pooling_factor`` f > 1: colpali-engine's ``HierarchicalTokenPooler`` clusters
  a page's tokens by similarity (Ward linkage) into at most tokens/f clusters and
  stores each cluster's normalised mean: ~1/f of the bytes and of the scan.
* ``mean_pooled_prefetch``: Qdrant's recipe for first-stage search. The page's
  multivector is stored as ``original`` (HNSW ``m=0``: only ever used to rerank) beside
  ``mean_pooling_rows`` and ``mean_pooling_columns``: one mean vector per row and per
  column of the image patch grid, with the page's non-image tokens (prompt, special
  tokens) kept as they are, as Qdrant's recipe does. A search prefetches candidates
  on rows and on columns and reranks their union with MaxSim on ``original``.

Both poolings run here, in the store, not in the embedder: what is stored is a
property of the collection (checked against the sidecar), ``documents.vectors``
keeps full-fidelity vectors so a collection with other options is a replay rather
than a re-embed, the row/column means need the full grid, and the hierarchical
pooler costs ~100 ms of CPU per 750-token page, CPU the embedder's threads must
spend keeping the GPU fed instead.

Pages published without a patch grid (older producers) are pooled as if their
tokens formed a near-square row-major grid (:func:`fallback_grid`), so they stay
findable by the prefetch stage.

With all three off but float16 the pages collection has one unnamed multivector,
the layout other ColPali tools expect.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from colstream.infra.settings import QdrantSettings
from colstream.schemas.errors import PipelineError
from colstream.schemas.events import DocumentRecord

DEFAULT_DIM = 128
# First-stage candidates per requested result, per prefetch (rows and columns each).
PREFETCH_CANDIDATES_PER_RESULT = 10
PREFETCH_MIN_CANDIDATES = 100

ORIGINAL_VECTOR = "original"
ROWS_VECTOR = "mean_pooling_rows"
COLUMNS_VECTOR = "mean_pooling_columns"

# Bumped when what a (pooling_factor, prefetch_vector) pair stores changes: scheme 1
# pooled runs of consecutive tokens into one "pooled" vector; scheme 2 is the
# hierarchical pooler plus row/column vectors. A plain layout is the same in both.
LAYOUT_SCHEME = 2

# Fixed namespaces: ids must be identical across processes, restarts and backends.
_PAGE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://colstream/pages")
_RECORD_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://colstream/records")

PAGE_PAYLOAD_KEYS = (
    "document_id", "version", "page_number", "total_pages", "filename", "blob_uri", "model", "metadata",
)
# Upload metadata sits in each page's payload under this key; filters address
# ``metadata.<key>``.
METADATA_PAYLOAD_KEY = "metadata"
TENANT_METADATA_KEY = "tenant"
DOCUMENT_ID_FILTER_KEY = "document_id"

FilterScalar = str | int | float | bool
# A search filter: ``document_id`` or a metadata key, each matched to one value or to any of a list.
PayloadFilter = Mapping[str, FilterScalar | Sequence[FilterScalar]]


class UnknownFilterKey(ValueError):
    """A filter names a key that is neither ``document_id`` nor an indexed metadata key."""

    def __init__(self, key: str, allowed: Sequence[str]) -> None:
        super().__init__(
            f"unknown filter key {key!r}; filter on one of {', '.join(repr(a) for a in allowed)} "
            "(metadata keys become filterable when listed in COLSTREAM_QDRANT__INDEXED_METADATA)"
        )
        self.key = key


def filter_keys(settings: QdrantSettings) -> list[str]:
    return [DOCUMENT_ID_FILTER_KEY, *settings.indexed_metadata]


def payload_path(key: str) -> str:
    return key if key == DOCUMENT_ID_FILTER_KEY else f"{METADATA_PAYLOAD_KEY}.{key}"


def filter_terms(
    settings: QdrantSettings, filter_: PayloadFilter | None, document_id: str | None = None
) -> list[tuple[str, list[FilterScalar]]]:
    """(payload path, accepted values) per key; every key must match (AND), any value of one key (OR).

    An empty list of values matches nothing. Unknown keys are refused, never ignored.
    """
    terms: list[tuple[str, list[FilterScalar]]] = []
    if document_id is not None:
        terms.append((DOCUMENT_ID_FILTER_KEY, [document_id]))
    allowed = filter_keys(settings)
    for key, value in (filter_ or {}).items():
        if key not in allowed:
            raise UnknownFilterKey(key, allowed)
        values = [value] if isinstance(value, str | int | float | bool) else list(value)
        terms.append((payload_path(key), values))
    return terms


class InvalidVectorsError(PipelineError, ValueError):
    """A page's multivector cannot be stored (wrong shape, NaN or inf)."""

    def __init__(self, message: str) -> None:
        super().__init__("InvalidVectors", message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,))


RANDOM_WEIGHTS_SUFFIX = " (random weights)"


@dataclass(frozen=True)
class IndexModel:
    """The model an index belongs to: recorded with the index when it is created.

    ``model_id`` is what ``from_pretrained`` was given (a hub id or a local folder),
    ``revision`` the exact weights (hub commit or a digest of a local checkpoint),
    ``dim`` the width of the model's projection layer, read from its weights.
    """

    family: str
    model_id: str
    revision: str
    dim: int
    random_weights: bool = False

    @property
    def label(self) -> str:
        """The model string pages carry in their payload (and vectors messages in ``model``)."""
        return self.model_id + (RANDOM_WEIGHTS_SUFFIX if self.random_weights else "")

    def same_model(self, other: IndexModel) -> bool:
        return (self.family, self.model_id, self.revision, self.dim) == (
            other.family,
            other.model_id,
            other.revision,
            other.dim,
        )

    def describe(self) -> str:
        return f"{self.family} {self.label} @ {self.revision} ({self.dim}-d)"

    def as_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "model_id": self.model_id,
            "revision": self.revision,
            "dim": self.dim,
            "random_weights": self.random_weights,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexModel:
        return cls(
            family=str(data["family"]),
            model_id=str(data["model_id"]),
            revision=str(data["revision"]),
            dim=int(data["dim"]),
            random_weights=bool(data.get("random_weights", False)),
        )

    @classmethod
    def unspecified(cls, dim: int) -> IndexModel:
        """For stores used without a model (tools, benchmarks, tests of the store itself)."""
        return cls(family="unspecified", model_id="unspecified", revision="none", dim=dim)


def migration_command(model: IndexModel) -> str:
    """The command that moves an index to ``model`` without downtime."""
    return f"colstream migrate start --family {model.family} --name-or-path {model.model_id}"


class IndexModelMismatch(PipelineError):
    """A stage's model differs from the model of the index it is pointed at."""

    def __init__(self, index: str, holds: IndexModel, wanted: IndexModel) -> None:
        super().__init__(
            "IndexModelMismatch",
            f"index {index!r} belongs to {holds.describe()}, but this stage is configured for "
            f"{wanted.describe()}. Vectors of two models cannot be ranked against each other, so "
            f"nothing was written. To move the index to the new model run `{migration_command(wanted)}`; "
            f"to keep the index, configure its model again (COLSTREAM_MODEL__FAMILY={holds.family} "
            f"COLSTREAM_MODEL__NAME_OR_PATH={holds.model_id}).",
        )
        self.index = index
        self.holds = holds
        self.wanted = wanted


def index_collection_name(alias: str, model: IndexModel) -> str:
    """The collection (or shard directory) that holds ``model``'s pages behind ``alias``.

    Readable (the checkpoint's last path part) and unique (a digest of id and revision):
    ``colpali_embeddings--colqwen2-v1.0--3f2a9c1b``.
    """
    import hashlib

    tail = model.model_id.rstrip("/").split("/")[-1] or model.family
    slug = "".join(c if c.isalnum() or c in "._-" else "-" for c in tail)[:48]
    digest = hashlib.sha256(json.dumps([model.family, model.model_id, model.revision]).encode()).hexdigest()[:8]
    return f"{alias}--{slug}--{digest}"


def bind_index_model(index: str, recorded: IndexModel | None, wanted: IndexModel, page_models: set[str]) -> IndexModel:
    """The model an existing index belongs to once ``wanted`` opens it, or IndexModelMismatch.

    ``recorded`` is what the index says about itself; None for an index created before
    indexes recorded their model. Such an index is adopted only when every page it
    holds was written by ``wanted`` (``page_models``: the payload models found).
    """
    if recorded is not None:
        if not recorded.same_model(wanted):
            raise IndexModelMismatch(index, recorded, wanted)
        return recorded
    foreign = sorted(page_models - {wanted.label})
    if foreign:
        holds = IndexModel(family="unknown", model_id=foreign[0], revision="unknown", dim=wanted.dim)
        raise IndexModelMismatch(index, holds, wanted)
    return wanted


def page_point_id(document_id: str, page_number: int) -> str:
    # JSON keeps the pair unambiguous whatever characters the id holds.
    return str(uuid.uuid5(_PAGE_NAMESPACE, json.dumps([document_id, page_number])))


def record_point_id(document_id: str) -> str:
    return str(uuid.uuid5(_RECORD_NAMESPACE, document_id))


@dataclass(frozen=True)
class PatchGrid:
    """Where a page's image tokens sit in its multivector: ``rows x cols`` row-major from ``start``."""

    start: int
    rows: int
    cols: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.rows < 1 or self.cols < 1:
            raise ValueError(f"invalid patch grid {self}")

    @property
    def stop(self) -> int:
        return self.start + self.rows * self.cols


def fallback_grid(tokens: int) -> PatchGrid:
    """The rule for a page without a grid: a near-square row-major grid from token 0.

    ``ceil(sqrt(n))`` columns and as many full rows as fit; the few tokens left over
    are kept as they are, like the non-image tokens of a real grid.
    """
    cols = max(1, math.ceil(math.sqrt(tokens)))
    return PatchGrid(start=0, rows=max(1, tokens // cols), cols=min(cols, tokens))


@dataclass(frozen=True)
class PagePoint:
    """One page as the store writes it. A value object that checks nothing: its vectors and
    grid were validated where they crossed a trust boundary, by the embedder on its output
    (``PageVectors.from_array``) and by the sink on its input (``check_vectors`` in
    ``consumers/sink/stage.py``, and the message's own schema for the grid), and the sink is
    the only producer of points from pipeline data."""

    document_id: str
    version: int
    page_number: int
    total_pages: int
    filename: str | None
    blob_uri: str | None
    model: str
    vectors: np.ndarray  # float16 or float32, [tokens, dim]
    # The image patch grid inside ``vectors``; None when the producer did not report one.
    grid: PatchGrid | None = None
    # The upload's metadata, stored with every page (replaced whole by a re-upload).
    metadata: Mapping[str, Any] | None = None

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
            METADATA_PAYLOAD_KEY: dict(self.metadata or {}),
        }


@dataclass(frozen=True)
class PagesLayout:
    """How the pages collection is shaped; fixed when it is created and stored beside it.

    * ``prefetch_vector`` False: one unnamed multivector, every token
      (``pooling_factor`` 0) or hierarchically pooled by ``pooling_factor``.
    * ``prefetch_vector`` True: named ``original`` (the same tokens as above) plus
      ``mean_pooling_rows`` and ``mean_pooling_columns`` from the full tokens.
    """

    dim: int
    float16: bool
    pooling_factor: int
    prefetch_vector: bool
    scheme: int = LAYOUT_SCHEME

    @property
    def named(self) -> bool:
        return self.prefetch_vector

    def stored_vectors(self, point: PagePoint) -> np.ndarray | dict[str, np.ndarray]:
        original = point.vectors
        if self.pooling_factor > 1:
            original = hierarchical_pool(original, self.pooling_factor)
        if not self.prefetch_vector:
            return original
        # Rows and columns come from the full tokens: the grid describes those.
        rows, columns = pool_rows_and_columns(point.vectors, point.grid)
        return {ORIGINAL_VECTOR: original, ROWS_VECTOR: rows, COLUMNS_VECTOR: columns}

    def as_dict(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "float16": self.float16,
            "pooling_factor": self.pooling_factor,
            "prefetch_vector": self.prefetch_vector,
            "scheme": self.scheme,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PagesLayout:
        return cls(
            dim=int(data["dim"]),
            float16=bool(data["float16"]),
            pooling_factor=int(data["pooling_factor"]),
            prefetch_vector=bool(data["prefetch_vector"]),
            scheme=int(data.get("scheme", 1)),  # sidecars written before the scheme existed
        )

    def _what_is_stored(self) -> tuple[int, int, bool, int]:
        plain = self.pooling_factor == 0 and not self.prefetch_vector
        return (self.dim, self.pooling_factor, self.prefetch_vector, LAYOUT_SCHEME if plain else self.scheme)

    def check_compatible(self, wanted: PagesLayout, where: str) -> None:
        # Storage precision may differ from today's settings; what is stored may not.
        mine, theirs = self._what_is_stored(), wanted._what_is_stored()
        if mine != theirs:
            raise RuntimeError(
                f"{where} holds (dim, pooling_factor, prefetch_vector, scheme)={mine}; settings ask for "
                f"{theirs}. Use another collection name (or directory) and re-index"
            )


def pages_layout(settings: QdrantSettings, dim: int) -> PagesLayout:
    return PagesLayout(
        dim=dim,
        float16=settings.on_disk_float16,
        pooling_factor=settings.token_pooling_factor if settings.token_pooling_factor > 1 else 0,
        prefetch_vector=settings.mean_pooled_prefetch,
    )


def hierarchical_pool(vectors: np.ndarray, factor: int) -> np.ndarray:
    """colpali-engine's hierarchical token pooling: at most ``tokens // factor`` normalised cluster means."""
    if factor <= 1 or vectors.shape[0] < 2:
        return vectors
    # Imported here: it pulls in torch and scipy, which a sink without pooling never needs.
    import torch
    from colpali_engine.compression.token_pooling import HierarchicalTokenPooler

    as_tensor = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    pooled = HierarchicalTokenPooler().pool_embeddings([as_tensor], pool_factor=factor)
    return np.asarray(pooled[0].numpy(), dtype=np.float32)


def pool_rows_and_columns(vectors: np.ndarray, grid: PatchGrid | None) -> tuple[np.ndarray, np.ndarray]:
    """Mean vector per grid row and per grid column, each between the page's non-image tokens.

    Returns ``(rows, columns)``: ``[prefix, row means (grid.rows), suffix]`` and
    ``[prefix, column means (grid.cols), suffix]``, where prefix and suffix are the
    tokens before and after the grid, unchanged.
    """
    grid = grid if grid is not None else fallback_grid(vectors.shape[0])
    as_float = vectors.astype(np.float32, copy=False)
    patches = as_float[grid.start : grid.stop].reshape(grid.rows, grid.cols, -1)
    prefix, suffix = as_float[: grid.start], as_float[grid.stop :]
    rows = np.concatenate([prefix, patches.mean(axis=1), suffix])
    columns = np.concatenate([prefix, patches.mean(axis=0), suffix])
    return rows, columns


def check_query(query: np.ndarray, dim: int) -> np.ndarray:
    array = np.asarray(query, dtype=np.float32)
    if array.ndim == 1:
        array = array.reshape(1, -1)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] != dim:
        raise InvalidVectorsError(f"query must be (tokens, {dim}), got shape {np.shape(query)}")
    if not np.isfinite(array).all():
        raise InvalidVectorsError("query vectors contain NaN or inf")
    return array


def check_page_vectors(vectors: np.ndarray, where: str, dim: int | None = None) -> None:
    """What a page's vectors must be to be stored, written once: a non-empty (tokens, dim)
    float16 or float32 array, every number finite, ``dim`` wide when given (the index's width).

    The sink runs it once on what it reads from the topic, to dead-letter a bad page on its
    own (``consumers/sink/stage.py``); :class:`PagePoint` does not repeat it. The stores'
    upserts compare only the width with their collection's (:func:`check_page_dims`)."""
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2 or vectors.shape[0] == 0:
        shape = getattr(vectors, "shape", None)
        raise InvalidVectorsError(f"{where}: expected a non-empty (tokens, dim) array, got shape {shape}")
    if vectors.dtype not in (np.float16, np.float32):
        raise InvalidVectorsError(f"{where}: vectors must be float16 or float32, got {vectors.dtype}")
    if dim is not None and vectors.shape[1] != dim:
        raise InvalidVectorsError(
            f"{where}: vectors have dimension {vectors.shape[1]}, the pages collection holds {dim}"
        )
    finite = np.isfinite(vectors)
    if not finite.all():
        bad_rows = int((~finite).any(axis=1).sum())
        # Qdrant would either reject the batch or store garbage that poisons MaxSim.
        raise InvalidVectorsError(f"{where}: {bad_rows} of {vectors.shape[0]} token vectors contain NaN or inf")


def check_page_dims(points: Sequence[PagePoint], dim: int) -> None:
    """The store's own guard for its collection: a point of another width would fail the
    whole batch inside Qdrant. One comparison per point; the values are not scanned again."""
    for point in points:
        if point.vectors.shape[1] != dim:
            check_page_vectors(point.vectors, f"document {point.document_id!r} page {point.page_number}", dim)


def record_from_payload(payload: dict[str, Any]) -> DocumentRecord:
    return DocumentRecord.model_validate(payload)


@runtime_checkable
class VectorStore(Protocol):
    def ensure_collections(self, dim: int | None = None, model: IndexModel | None = None) -> None:
        """Open the index behind the alias for ``model`` (created when absent); idempotent.

        Raises :class:`IndexModelMismatch` when the alias points at another model's
        index. ``dim`` alone binds an unspecified model of that width (tools, tests);
        neither opens what exists and creates only the records collection.
        """

    def index_model(self) -> IndexModel | None:
        """The model of the index the alias points at; None before one exists."""

    def upsert_pages(self, points: Sequence[PagePoint]) -> None:
        """Write pages; durable when it returns."""

    def delete_document(self, document_id: str, below_version: int | None = None) -> None:
        """Delete every page of a document, or only those with version < below_version."""

    def delete_documents(self, purges: Sequence[tuple[str, int | None]]) -> None:
        """``delete_document`` for many documents at once; durable when it returns."""

    def page_payloads(self, document_id: str | None = None) -> list[dict[str, Any]]: ...

    def count_pages(self, document_id: str | None = None, filter: PayloadFilter | None = None) -> int: ...

    def search(
        self,
        query: np.ndarray,
        limit: int = 10,
        document_id: str | None = None,
        prefetch: bool = True,
        filter: PayloadFilter | None = None,
    ) -> list[tuple[float, dict[str, Any]]]:
        """MaxSim search; (score, page payload), best first, over the pages that match
        ``document_id`` and ``filter`` (see :func:`filter_terms`; unknown keys raise
        :class:`UnknownFilterKey`).

        With the row/column layout, ``prefetch=False`` skips the first stage and scans
        every page's full multivector (to measure what the first stage saves and loses).
        """

    def get_records(self, document_ids: Sequence[str]) -> dict[str, DocumentRecord]: ...

    def put_records(self, records: Sequence[DocumentRecord]) -> None:
        """Write per-document records; durable when it returns."""

    def list_records(self) -> list[DocumentRecord]: ...

    def delete_records(self, document_ids: Sequence[str]) -> None:
        """Forget documents' records (``colstream gc`` expires tombstone records)."""

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def open_vector_store(settings: QdrantSettings) -> VectorStore:
    """Qdrant server when a URL is configured, otherwise the embedded Edge shards."""
    if settings.url:
        from colstream.infra.vectorstore_qdrant import QdrantServerVectorStore

        return QdrantServerVectorStore(settings)
    from colstream.infra.vectorstore_edge import EdgeVectorStore

    return EdgeVectorStore(settings)
