"""Request and response bodies of the REST API.

Shapes of the original services are kept field for field (``/documents``,
``/ingest/*``, ``/stats`` from the ColPali API; ``/embed``, ``/embed_batch``
from the ColQwen2 service); what the streaming design adds (state, version,
page accounting) comes as extra fields so old clients keep working.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

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
    device: str | None = Field(description="Where the model runs (or would run: it loads on first use).")
    model: str | None = None
    stages: dict[str, Any] | None = Field(
        default=None, description="Per-stage counters of the stages running in this process."
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
    error: str | None = None
    updated_at: datetime


class IngestResponse(BaseModel):
    """Seed shape of a finished ingestion, plus where the pipeline left the document."""

    document_id: str
    filename: str | None
    total_pages: int
    embedding_dimension: int | None
    tokens_per_page: int | None = Field(
        default=None, description="Not tracked by the pipeline (pages vary); null unless known."
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
    image: str = Field(description="Base64-encoded image (a data: URL prefix is accepted).")


class EmbedBatchRequest(BaseModel):
    images: list[str] = Field(min_length=1, max_length=MAX_EMBED_BATCH)


class EmbedQueryRequest(BaseModel):
    text: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)


class EmbedResponse(BaseModel):
    embedding: list[list[float]] = Field(description="Multivector: one row per real token (no padding).")
    dim: int
    num_tokens: int
    model: str


class EmbedBatchResponse(BaseModel):
    embeddings: list[list[list[float]]]
    count: int
    dim: int
    num_tokens: list[int]
    model: str


class SearchRequest(BaseModel):
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    limit: int = Field(default=5, ge=1, le=MAX_SEARCH_LIMIT)
    document_id: str | None = None


class SearchHit(BaseModel):
    score: float
    document_id: str | None
    page_number: int | None
    model: str | None = Field(default=None, description="The model of the index this page came from.")
    payload: dict[str, Any]


class SearchResponse(BaseModel):
    query: str
    hits: list[SearchHit]
    model: str


class ErrorResponse(BaseModel):
    detail: str
