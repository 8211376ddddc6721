"""Request and response bodies of the REST API.

Shapes of the original services are kept field for field (``/documents``,
``/ingest/*``, ``/stats`` from the ColPali API; ``/embed``, ``/embed_batch``
from the ColQwen2 service); what the streaming design adds (state, version,
page accounting) comes as extra fields so old clients keep working.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from colstream.schemas.ids import DocumentId

DocumentState = Literal["indexing", "complete", "partial", "failed", "deleted"]

# A request can ask for at most this many images in one /embed_batch call: the model
# holds them all in memory at once.
MAX_EMBED_BATCH = 64
MAX_SEARCH_LIMIT = 100
MAX_QUERY_CHARS = 4096


class HealthResponse(BaseModel):
    status: Literal["healthy", "degraded"]
    kafka_connected: bool
    qdrant_connected: bool
    model_loaded: bool
    gpu_available: bool = Field(description="Whether a CUDA device is visible to this process.")
    device: str | None = Field(description="Where the model runs (or would run: it loads on first use).")
    model: str | None = None
    stages: dict[str, Any] | None = Field(
        default=None, description="Per-stage counters of the stages running in this process."
    )
    checks: dict[str, Any] | None = Field(
        default=None, description="Last background check of Kafka and Qdrant: ok, detail and age_s (seconds)."
    )


class DocumentSummary(BaseModel):
    document_id: str
    filename: str | None
    total_pages: int
    embedding_dimension: int | None
    state: DocumentState
    version: int = Field(description="Offset of the upload record on the uploads topic.")
    indexed_pages: int = Field(description="How many pages are searchable.")
    failed_pages: list[int]
    updated_at: datetime


class DocumentDetail(BaseModel):
    document_id: str
    version: int
    state: DocumentState
    filename: str | None = None
    blob_uri: str | None = None
    model: str | None = None
    total_pages: int
    indexed_pages: list[int]
    failed_pages: list[int]
    embedding_dimension: int | None = None
    tokens_per_page: int | None = None
    metadata: dict[str, Any] | None = None
    error: str | None = None
    updated_at: datetime


class IngestResponse(BaseModel):
    """Seed shape of a finished ingestion, plus where the pipeline left the document."""

    document_id: str
    filename: str | None
    total_pages: int
    embedding_dimension: int | None
    tokens_per_page: int | None = Field(
        default=None, description="Most token vectors of any indexed page; null until a page is indexed."
    )
    message: str
    state: DocumentState
    version: int | None
    indexed_pages: int = 0
    failed_pages: list[int] = Field(default_factory=list)
    error: str | None = None


class AcceptedResponse(BaseModel):
    """The upload is on the uploads topic; the pipeline has not finished it (yet)."""

    document_id: str
    status: Literal["accepted"] = "accepted"
    version: int | None
    filename: str | None = None
    state: DocumentState | None = Field(default=None, description="Current state, when a record exists.")
    message: str | None = None


class DeleteResponse(BaseModel):
    message: str
    status: Literal["accepted", "deleted"]
    document_id: str
    version: int | None = Field(description="Offset of the tombstone on the uploads topic.")


class StatsResponse(BaseModel):
    collection_name: str
    total_vectors: int
    vector_dimension: int | None
    distance_metric: str
    backend: str | None = None


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="Base64-encoded image (a data: URL prefix is accepted).")


class EmbedBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(min_length=1, max_length=MAX_EMBED_BATCH)


class EmbedQueryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)


class EmbedResponse(BaseModel):
    embedding: list[list[float]] = Field(description="Multivector: one row per real token (no padding).")
    dim: int
    num_tokens: int
    model: str


class PooledEmbedResponse(BaseModel):
    """``?pooled=true``: the seed's flat vector, the mean of the token vectors."""

    embedding: list[float]
    dim: int
    num_tokens: int = Field(description="How many token vectors the mean was taken over.")
    model: str


class EmbedBatchResponse(BaseModel):
    embeddings: list[list[list[float]]]
    count: int
    dim: int
    num_tokens: list[int]
    model: str


FilterScalar = Annotated[str, Field(max_length=1024)] | int | float | bool
FilterValue = FilterScalar | Annotated[list[FilterScalar], Field(max_length=100)]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    top_k: int = Field(default=5, ge=1, le=MAX_SEARCH_LIMIT, description="How many pages to return.")
    limit: int | None = Field(
        default=None, ge=1, le=MAX_SEARCH_LIMIT, deprecated=True, description="The former name of top_k."
    )
    filter: dict[str, FilterValue] | None = Field(
        default=None,
        max_length=16,
        description=(
            "Pages whose payload matches every key: `document_id` or a metadata key listed in "
            "COLSTREAM_QDRANT__INDEXED_METADATA, each equal to a value or to any of a list of values. "
            "Any other key is a 400 that names it."
        ),
        examples=[{"tenant": "acme", "document_id": ["inv-1", "inv-2"]}],
    )
    document_id: DocumentId | None = Field(
        default=None, deprecated=True, description='Shorthand for {"filter": {"document_id": ...}}.'
    )

    @model_validator(mode="after")
    def _limit_is_top_k(self) -> SearchRequest:
        if self.limit is not None:
            if "top_k" in self.model_fields_set and self.top_k != self.limit:
                raise ValueError(f"top_k ({self.top_k}) and its alias limit ({self.limit}) disagree; send one")
            self.top_k = self.limit
        return self


class SearchResult(BaseModel):
    document_id: str
    page_number: int
    score: float
    metadata: dict[str, Any] = Field(description="The upload's metadata, as stored with every page.")
    model: str | None = Field(default=None, description="The model of the index this page came from.")


class SearchResponse(BaseModel):
    results: list[SearchResult]
    query: str
    model: str = Field(description="The model that embedded the query.")


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="Where: body, query, path or header, then the field.")
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx body: a message a person can act on."""

    detail: str = Field(description="What went wrong and what to do about it.")
    errors: list[FieldError] | None = Field(default=None, description="For a 422: each invalid field.")
