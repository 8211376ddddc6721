"""Qdrant server backend through qdrant-client (also runs against its local mode in tests).

Each model's pages live in their own collection, ``<alias>--<model>--<digest>``
(:func:`~colstream.infra.vectorstore.index_collection_name`), and the alias
``settings.collection`` (``colpali_embeddings``) points at the one being served.
The collection's metadata records its model and layout. A collection named like
the alias itself predates aliases and is used as it is. qdrant-client's local
mode has no aliases: there a lone ``<alias>--*`` collection is taken as the index.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from qdrant_client import QdrantClient
from qdrant_client import models as qm
from qdrant_client.http.exceptions import UnexpectedResponse

from colstream.infra.settings import QdrantSettings
from colstream.infra.vectorstore import (
    COLUMNS_VECTOR,
    ORIGINAL_VECTOR,
    PREFETCH_CANDIDATES_PER_RESULT,
    PREFETCH_MIN_CANDIDATES,
    ROWS_VECTOR,
    TENANT_METADATA_KEY,
    FilterScalar,
    IndexModel,
    PagePoint,
    PagesLayout,
    PayloadFilter,
    bind_index_model,
    check_page_dims,
    check_query,
    filter_terms,
    index_collection_name,
    pages_layout,
    payload_path,
    record_from_payload,
    record_point_id,
)
from colstream.schemas.events import DocumentRecord

log = logging.getLogger(__name__)

_LAYOUT_METADATA_KEY = "colstream_pages_layout"
_MODEL_METADATA_KEY = "colstream_index_model"
_RECORDS_METADATA_KEY = "colstream_records_collection"
# Pages read to tell which model wrote an index that predates recorded models.
_LEGACY_SAMPLE = 256
_SCROLL_PAGE = 256
# The server refuses requests over 32 MB by default. REST sends floats as JSON text,
# up to ~24 bytes each ("-0.0123291015625,"), so budget on that, with headroom.
_REQUEST_BUDGET_BYTES = 24 * 1024 * 1024
_BYTES_PER_FLOAT_JSON = 24
_BYTES_PER_POINT_OVERHEAD = 2048
_TIMEOUT_S = 120


class QdrantServerVectorStore:
    backend = "qdrant"

    def __init__(
        self,
        settings: QdrantSettings,
        client: QdrantClient | None = None,
        *,
        index: str | None = None,
        records: str | None = None,
    ) -> None:
        """``index`` pins the store to that collection instead of the one the alias points at
        (a migration writes its target this way): created there, the alias left alone.
        ``records`` names the records collection of a new index."""
        self._settings = settings
        if client is None:
            if not settings.url:
                raise ValueError("QdrantServerVectorStore needs settings.url or a ready QdrantClient")
            client = server_client(settings, timeout_s=_TIMEOUT_S)
        self._client = client
        self._alias = settings.collection
        # The concrete collection behind the alias, once known (until then the alias).
        self._pages = index or settings.collection
        self._pinned = self._resolved = index is not None
        # Each index names its records collection in its metadata; one that names none uses
        # the configured records collection.
        self._records_default = records or settings.records_collection
        self._records_name: str | None = None
        self._layout: PagesLayout | None = None
        self._model: IndexModel | None = None
        self._known_collections: set[str] = set()

    def _resolve_index(self) -> None:
        """Find the collection the alias points at; stays unresolved while there is none."""
        if self._resolved:
            return
        for alias in self._client.get_aliases().aliases:
            if alias.alias_name == self._alias:
                self._pages, self._resolved = alias.collection_name, True
                return
        names = [c.name for c in self._client.get_collections().collections]
        candidates = [n for n in names if n.startswith(f"{self._alias}--")]
        if self._alias in names:
            self._pages, self._resolved = self._alias, True
        elif len(candidates) == 1:
            self._pages, self._resolved = candidates[0], True

    def index_model(self) -> IndexModel | None:
        if self._model is None and self._exists(self._pages):
            self._model = self._model_of_existing()
        return self._model

    @property
    def index_name(self) -> str:
        self._resolve_index()
        return self._pages

    @property
    def _records(self) -> str:
        if self._records_name is None:
            if not self._exists(self._pages):
                return self._records_default  # no index yet: decided when it is created
            metadata = self._client.get_collection(self._pages).config.metadata or {}
            recorded = metadata.get(_RECORDS_METADATA_KEY)
            self._records_name = recorded if isinstance(recorded, str) and recorded else self._records_default
        return self._records_name

    @property
    def records_name(self) -> str:
        return self._records

    def _model_of_existing(self) -> IndexModel | None:
        recorded = (self._client.get_collection(self._pages).config.metadata or {}).get(_MODEL_METADATA_KEY)
        return IndexModel.from_dict(recorded) if isinstance(recorded, dict) else None

    def _sample_page_models(self) -> set[str]:
        records, _ = self._client.scroll(self._pages, limit=_LEGACY_SAMPLE, with_payload=["model"])
        return {str(r.payload["model"]) for r in records if r.payload and r.payload.get("model")}

    def _point_alias(self, collection: str) -> None:
        if any(a.alias_name == self._alias for a in self._client.get_aliases().aliases):
            return  # another replica was first; _resolve_index follows it next time
        self._client.update_collection_aliases(
            change_aliases_operations=[
                qm.CreateAliasOperation(create_alias=qm.CreateAlias(collection_name=collection, alias_name=self._alias))
            ]
        )

    def _bind_index(self, model: IndexModel) -> None:
        """Open (or create) ``model``'s index behind the alias; IndexModelMismatch before any write."""
        wanted = pages_layout(self._settings, model.dim)
        self._resolve_index()
        if not self._resolved or (self._pinned and not self._exists(self._pages)):
            name = self._pages if self._pinned else index_collection_name(self._alias, model)
            if not self._exists(name):
                self._create_quietly(
                    name,
                    **self._settings.cluster_layout(),
                    quantization_config=_quantization_config(self._settings),
                    vectors_config=_pages_vectors_config(wanted),
                    metadata={_LAYOUT_METADATA_KEY: wanted.as_dict(), _MODEL_METADATA_KEY: model.as_dict(),
                              _RECORDS_METADATA_KEY: self._records_default},
                )
            if not self._pinned:
                self._point_alias(name)
            self._pages, self._resolved = name, True
        where = f"index {self._alias!r} (collection {self._pages!r})"
        recorded = self._model_of_existing()
        page_models = set() if recorded is not None else self._sample_page_models()
        bound = bind_index_model(where, recorded, model, page_models)
        existing = self._layout_of_existing()
        if existing is None:
            raise RuntimeError(f"collection {self._pages!r} exists but is not a page multivector collection")
        existing.check_compatible(wanted, where)
        if recorded is None:
            # An index from before models were recorded, written by this model only.
            self._client.update_collection(self._pages, metadata={_MODEL_METADATA_KEY: bound.as_dict()})
        self._apply_quantization()
        self._layout, self._model = existing, bound

    def _apply_quantization(self) -> None:
        """Quantization is an index over the stored vectors, not what is stored: a change of
        the setting rebuilds it in place (the server quantizes in the background)."""
        wanted = _quantization_config(self._settings)
        current = self._client.get_collection(self._pages).config.quantization_config
        if _quantization_kind(current) == _quantization_kind(wanted):
            return
        before, after = _quantization_kind(current), _quantization_kind(wanted)
        log.info("index %s: quantization %s -> %s", self._pages, before, after)
        self._client.update_collection(self._pages, quantization_config=wanted or qm.Disabled.DISABLED)

    def _ensure_records(self) -> None:
        if not self._exists(self._records):
            # Records carry no vector: the server allows vector-less collections.
            self._create_quietly(self._records, vectors_config={}, **self._settings.cluster_layout(sharded=False))
        self._client.create_payload_index(self._records, "document_id", qm.PayloadSchemaType.KEYWORD, wait=True)

    def _exists(self, collection: str) -> bool:
        if collection == self._pages and not self._resolved:
            self._resolve_index()
            if not self._resolved:
                return False
            collection = self._pages
        # Collections are never dropped by this store: once seen, skip the round trip.
        if collection not in self._known_collections and self._client.collection_exists(collection):
            self._known_collections.add(collection)
        return collection in self._known_collections

    # -- collections -------------------------------------------------------------------------

    def ensure_collections(self, dim: int | None = None, model: IndexModel | None = None) -> None:
        wanted_model = model or (IndexModel.unspecified(dim) if dim is not None else None)
        if wanted_model is None:
            self._ensure_records()
            return
        self._bind_index(wanted_model)
        # Creating an existing index is a no-op on the server.
        for field, schema in (
            ("document_id", qm.PayloadSchemaType.KEYWORD),
            ("version", qm.PayloadSchemaType.INTEGER),
        ):
            self._client.create_payload_index(self._pages, field, schema, wait=True)
        for key in self._settings.indexed_metadata:
            # The tenant index co-locates each tenant's pages on disk (Qdrant's multitenancy layout).
            metadata_schema: qm.PayloadSchemaType | qm.KeywordIndexParams = (
                qm.KeywordIndexParams(type=qm.KeywordIndexType.KEYWORD, is_tenant=True)
                if key == TENANT_METADATA_KEY
                else qm.PayloadSchemaType.KEYWORD
            )
            self._client.create_payload_index(self._pages, payload_path(key), metadata_schema, wait=True)
        if not self._exists(self._records):
            # Records carry no vector: the server allows vector-less collections.
            self._create_quietly(self._records, vectors_config={}, **self._settings.cluster_layout(sharded=False))
        self._client.create_payload_index(
            self._records, "document_id", qm.PayloadSchemaType.KEYWORD, wait=True
        )

    def _create_quietly(self, name: str, **kwargs: Any) -> None:
        try:
            self._client.create_collection(name, **kwargs)
        except UnexpectedResponse as exc:
            # Another replica created it between our check and our call.
            if exc.status_code != 409:
                raise
        except ValueError as exc:  # local mode says "already exists" this way
            if "already exists" not in str(exc):
                raise

    def _layout_of_existing(self) -> PagesLayout | None:
        config = self._client.get_collection(self._pages).config
        stored = (config.metadata or {}).get(_LAYOUT_METADATA_KEY)
        if stored:
            return PagesLayout.from_dict(stored)
        vectors = config.params.vectors
        if isinstance(vectors, qm.VectorParams) and vectors.multivector_config is not None:
            # Made by another tool with the plain layout.
            return PagesLayout(
                dim=vectors.size,
                float16=vectors.datatype == qm.Datatype.FLOAT16,
                pooling_factor=0,
                prefetch_vector=False,
            )
        return None

    def _current_layout(self) -> PagesLayout:
        if self._layout is None:
            if not self._exists(self._pages):
                raise RuntimeError("pages collection does not exist yet: call ensure_collections() first")
            self._layout = self._layout_of_existing()
            if self._layout is None:
                raise RuntimeError(f"collection {self._pages!r} is not a page multivector collection")
        return self._layout

    # -- pages -------------------------------------------------------------------------------

    def upsert_pages(self, points: Sequence[PagePoint]) -> None:
        if not points:
            return
        layout = self._current_layout()
        check_page_dims(points, layout.dim)
        for batch in _batches_under_budget(points, layout):
            self._client.upsert(self._pages, points=batch, wait=True)

    def delete_document(self, document_id: str, below_version: int | None = None) -> None:
        if not self._exists(self._pages):
            return
        self._client.delete(
            self._pages,
            points_selector=qm.FilterSelector(filter=_document_filter(document_id, below_version)),
            wait=True,
        )

    def delete_documents(self, purges: Sequence[tuple[str, int | None]]) -> None:
        for document_id, below_version in purges:
            self.delete_document(document_id, below_version)

    def page_payloads(self, document_id: str | None = None) -> list[dict[str, Any]]:
        if not self._exists(self._pages):
            return []
        filter_ = _document_filter(document_id) if document_id is not None else None
        return [dict(record.payload or {}) for record in self._scroll(self._pages, filter_)]

    def count_pages(self, document_id: str | None = None, filter: PayloadFilter | None = None) -> int:
        terms = filter_terms(self._settings, filter, document_id)
        if not self._exists(self._pages) or any(not values for _, values in terms):
            return 0
        return int(self._client.count(self._pages, count_filter=_terms_filter(terms), exact=True).count)

    def search(
        self,
        query: np.ndarray,
        limit: int = 10,
        document_id: str | None = None,
        prefetch: bool = True,
        filter: PayloadFilter | None = None,
        exact: bool = False,
    ) -> list[tuple[float, dict[str, Any]]]:
        """Best pages by MaxSim. ``exact`` skips the quantized first stage (a reference for
        measuring it); the row/column prefetch is skipped with ``prefetch=False``."""
        terms = filter_terms(self._settings, filter, document_id)
        if limit <= 0 or not self._exists(self._pages) or any(not values for _, values in terms):
            return []
        layout = self._current_layout()
        vectors = check_query(query, layout.dim).tolist()
        filter_ = _terms_filter(terms)
        params = _search_params(self._settings, exact=exact)
        if prefetch and self._settings.mean_pooled_prefetch and layout.named:
            candidates = max(limit * PREFETCH_CANDIDATES_PER_RESULT, PREFETCH_MIN_CANDIDATES)
            response = self._client.query_points(
                self._pages,
                prefetch=[
                    qm.Prefetch(query=vectors, using=using, limit=candidates, filter=filter_, params=params)
                    for using in (ROWS_VECTOR, COLUMNS_VECTOR)
                ],
                query=vectors,
                using=ORIGINAL_VECTOR,
                query_filter=filter_,
                search_params=params,
                limit=limit,
                with_payload=True,
            )
        else:
            response = self._client.query_points(
                self._pages,
                query=vectors,
                using=ORIGINAL_VECTOR if layout.named else None,
                query_filter=filter_,
                search_params=params,
                limit=limit,
                with_payload=True,
            )
        model = self.index_model()
        label = model.label if model is not None else None
        hits = [(float(hit.score), dict(hit.payload or {})) for hit in response.points]
        return [(score, {**payload, "model": label}) if label else (score, payload) for score, payload in hits]

    # -- records -----------------------------------------------------------------------------

    def get_records(self, document_ids: Sequence[str]) -> dict[str, DocumentRecord]:
        if not document_ids or not self._exists(self._records):
            return {}
        found = self._client.retrieve(
            self._records,
            ids=[record_point_id(doc) for doc in dict.fromkeys(document_ids)],
            with_payload=True,
            with_vectors=False,
        )
        records = (record_from_payload(dict(hit.payload or {})) for hit in found)
        return {record.document_id: record for record in records}

    def put_records(self, records: Sequence[DocumentRecord]) -> None:
        if not records:
            return
        if not self._exists(self._records):
            self._create_quietly(self._records, vectors_config={}, **self._settings.cluster_layout(sharded=False))
        self._client.upsert(
            self._records,
            points=[
                qm.PointStruct(
                    id=record_point_id(record.document_id), vector={}, payload=record.model_dump(mode="json")
                )
                for record in records
            ],
            wait=True,
        )

    def list_records(self) -> list[DocumentRecord]:
        if not self._exists(self._records):
            return []
        return [record_from_payload(dict(hit.payload or {})) for hit in self._scroll(self._records, None)]

    def delete_records(self, document_ids: Sequence[str]) -> None:
        """Forget documents' records (expired tombstones); their pages are gone already."""
        if not document_ids or not self._exists(self._records):
            return
        ids: list[Any] = [record_point_id(doc) for doc in dict.fromkeys(document_ids)]
        self._client.delete(self._records, points_selector=qm.PointIdsList(points=ids), wait=True)

    # -- housekeeping ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        exists = self._exists(self._pages)
        return {
            "collection_name": self._alias,
            "index": self._pages if exists else None,
            "model": model.as_dict() if (model := self.index_model() if exists else None) else None,
            "total_vectors": self.count_pages() if exists else 0,
            "vector_dimension": self._current_layout().dim if exists else None,
            "distance_metric": "COSINE",
            "backend": self.backend,
        }

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> QdrantServerVectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _scroll(self, collection: str, filter_: qm.Filter | None) -> Iterator[qm.Record]:
        offset: Any = None
        while True:
            records, offset = self._client.scroll(
                collection,
                scroll_filter=filter_,
                limit=_SCROLL_PAGE,
                offset=offset,
                with_payload=True,
                with_vectors=False,
            )
            yield from records
            if offset is None:
                return


def _quantization_config(settings: QdrantSettings) -> qm.QuantizationConfig | None:
    if settings.quantization == "int8":
        return qm.ScalarQuantization(scalar=qm.ScalarQuantizationConfig(type=qm.ScalarType.INT8, always_ram=True))
    if settings.quantization == "binary":
        return qm.BinaryQuantization(binary=qm.BinaryQuantizationConfig(always_ram=True))
    return None


def _quantization_kind(config: Any) -> str:
    if isinstance(config, qm.ScalarQuantization):
        return "int8"
    if isinstance(config, qm.BinaryQuantization):
        return "binary"
    return "none"


def _search_params(settings: QdrantSettings, exact: bool) -> qm.SearchParams | None:
    if settings.quantization == "none":
        return None
    if exact:
        return qm.SearchParams(quantization=qm.QuantizationSearchParams(ignore=True))
    return qm.SearchParams(
        quantization=qm.QuantizationSearchParams(
            ignore=False, rescore=True, oversampling=settings.quantization_oversampling
        )
    )


def _pages_vectors_config(layout: PagesLayout) -> qm.VectorParams | dict[str, qm.VectorParams]:
    def multivector(graph: bool) -> qm.VectorParams:
        return qm.VectorParams(
            size=layout.dim,
            distance=qm.Distance.COSINE,
            multivector_config=qm.MultiVectorConfig(comparator=qm.MultiVectorComparator.MAX_SIM),
            datatype=qm.Datatype.FLOAT16 if layout.float16 else qm.Datatype.FLOAT32,
            on_disk=layout.float16 or None,
            # m=0: the full multivector is only ever scanned or used to rerank; a graph
            # over ~700 vectors per page costs far more to build than it saves.
            hnsw_config=None if graph else qm.HnswConfigDiff(m=0),
        )

    if not layout.named:
        return multivector(graph=False)
    # Rows and columns are the first stage: on a server they get the default HNSW graph.
    return {
        ORIGINAL_VECTOR: multivector(graph=False),
        ROWS_VECTOR: multivector(graph=True),
        COLUMNS_VECTOR: multivector(graph=True),
    }


def _server_point(point: PagePoint, layout: PagesLayout) -> tuple[qm.PointStruct, int]:
    """The point to send and its estimated request size."""
    stored = layout.stored_vectors(point)
    vector: Any
    if isinstance(stored, dict):
        vector = {name: array.astype(np.float32).tolist() for name, array in stored.items()}
        floats = sum(array.size for array in stored.values())
    else:
        vector = stored.astype(np.float32).tolist()
        floats = stored.size
    size = floats * _BYTES_PER_FLOAT_JSON + _BYTES_PER_POINT_OVERHEAD
    return qm.PointStruct(id=point.point_id, vector=vector, payload=point.payload()), size


def _batches_under_budget(points: Sequence[PagePoint], layout: PagesLayout) -> Iterator[list[qm.PointStruct]]:
    batch: list[qm.PointStruct] = []
    used = 0
    for point in points:
        server_point, size = _server_point(point, layout)
        if batch and used + size > _REQUEST_BUDGET_BYTES:
            yield batch
            batch, used = [], 0
        batch.append(server_point)
        used += size
    if batch:
        yield batch


def _document_filter(document_id: str, below_version: int | None = None) -> qm.Filter:
    conditions: list[qm.Condition] = [
        qm.FieldCondition(key="document_id", match=qm.MatchValue(value=document_id))
    ]
    if below_version is not None:
        conditions.append(qm.FieldCondition(key="version", range=qm.Range(lt=below_version)))
    return qm.Filter(must=conditions)


def _value_condition(path: str, value: FilterScalar) -> qm.Condition:
    if isinstance(value, float) and not value.is_integer():
        return qm.FieldCondition(key=path, range=qm.Range(gte=value, lte=value))
    if isinstance(value, float):
        value = int(value)
    return qm.FieldCondition(key=path, match=qm.MatchValue(value=value))


def _terms_filter(terms: list[tuple[str, list[FilterScalar]]]) -> qm.Filter | None:
    """Every term must hold; a term holds when the payload matches any of its values."""
    if not terms:
        return None
    must: list[qm.Condition] = []
    for path, values in terms:
        if len(values) > 1 and (all(isinstance(v, str) for v in values) or all(type(v) is int for v in values)):
            must.append(qm.FieldCondition(key=path, match=qm.MatchAny(any=values)))  # type: ignore[arg-type]
        elif len(values) == 1:
            must.append(_value_condition(path, values[0]))
        else:
            must.append(qm.Filter(should=[_value_condition(path, v) for v in values]))
    return qm.Filter(must=must)


def server_client(settings: QdrantSettings, *, timeout_s: int) -> QdrantClient:
    """A client of the configured server, with its key when one is set."""
    api_key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    return QdrantClient(url=settings.url, api_key=api_key, timeout=timeout_s)


# -- index administration (migrations) ------------------------------------------------------
def point_alias(client: QdrantClient, alias: str, index: str) -> None:
    """Point ``alias`` at ``index`` in one request: the server applies the operations atomically."""
    if not client.collection_exists(index):
        raise RuntimeError(f"no collection {index!r}")
    operations: list[qm.AliasOperations] = []
    if any(a.alias_name == alias for a in client.get_aliases().aliases):
        operations.append(qm.DeleteAliasOperation(delete_alias=qm.DeleteAlias(alias_name=alias)))
    operations.append(qm.CreateAliasOperation(create_alias=qm.CreateAlias(collection_name=index, alias_name=alias)))
    client.update_collection_aliases(change_aliases_operations=operations)


def drop_index(client: QdrantClient, alias: str, index: str, records: str | None) -> None:
    """Delete an index collection and its records collection; the alias must point elsewhere."""
    if any(a.alias_name == alias and a.collection_name == index for a in client.get_aliases().aliases):
        raise RuntimeError(f"collection {index!r} is what alias {alias!r} serves; point it elsewhere first")
    for name in (index, records):
        if name and client.collection_exists(name):
            client.delete_collection(name)
