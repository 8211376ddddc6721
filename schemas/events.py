"""The event contracts every topic carries.

All payloads are plain JSON a person can type with kcat. Binary parts (page
images, float16 vectors) are base64 inside that JSON. Every model is frozen:
where a record came from (topic, partition, offset) travels beside it (the stage
runner's ``RawRecord``), never inside it.

Versions: an upload's version is the offset of its record in the compacted,
document_id-keyed uploads topic. Offsets only grow per partition and a key
always maps to one partition, so the version only grows per document_id, and
a replay of the topic reproduces the same versions. Pages and vectors carry
it, and the sink keeps only the newest.
"""

from __future__ import annotations

import base64
import math
import re
from datetime import UTC, datetime
from functools import cached_property
from typing import Annotated, Any, Literal, TypeAlias

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, WithJsonSchema, field_validator, model_validator

from colstream.schemas.ids import DocumentId, check_document_id
from colstream.schemas.uris import redact_uris_in_text, strip_query, uri_basename

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})



def _without_query(value: str | None) -> str | None:
    return strip_query(value) if value is not None else None


def _name_without_query(value: str | None) -> str | None:
    # A name derived from a URL with a SAS query once kept the query; cut it off.
    if value is not None and "?" in value and "=" in value.split("?", 1)[1]:
        return value.split("?", 1)[0] or None
    return value


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_schema_version(value: int) -> int:
    if value not in SUPPORTED_SCHEMA_VERSIONS:
        raise ValueError(
            f"unsupported schema_version {value}; this build understands {sorted(SUPPORTED_SCHEMA_VERSIONS)}"
        )
    return value


def _check_document_id(value: str) -> str:
    return check_document_id(value)


# Upload metadata is copied into every page's payload and filtered on: keys become
# payload paths (``metadata.<key>``), values stay small and flat.
METADATA_KEY_PATTERN = r"[A-Za-z_][A-Za-z0-9_-]{0,63}"
_METADATA_KEY_RE = re.compile(METADATA_KEY_PATTERN)
MAX_METADATA_KEYS = 64
MAX_METADATA_STRING = 1024
MAX_METADATA_LIST = 100

MetadataValue = str | int | float | bool | list[str]


def _check_metadata_value(key: str, value: Any) -> None:
    where = f"metadata key {key!r}"
    if isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: numbers must be finite")
        return
    if isinstance(value, str):
        if len(value) > MAX_METADATA_STRING:
            raise ValueError(f"{where}: strings are limited to {MAX_METADATA_STRING} characters")
        return
    if isinstance(value, list):
        if len(value) > MAX_METADATA_LIST:
            raise ValueError(f"{where}: lists are limited to {MAX_METADATA_LIST} strings")
        for item in value:
            if not isinstance(item, str):
                raise ValueError(f"{where}: a list may hold only strings, found {type(item).__name__}")
            if len(item) > MAX_METADATA_STRING:
                raise ValueError(f"{where}: strings are limited to {MAX_METADATA_STRING} characters")
        return
    kind = "null" if value is None else type(value).__name__
    raise ValueError(f"{where}: value must be a string, number, boolean or list of strings, got {kind}")


def check_metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """The one rule for document metadata, wherever it comes from (REST, CLI, kcat, Event Grid)."""
    if value is None:
        return None
    if len(value) > MAX_METADATA_KEYS:
        raise ValueError(f"metadata holds {len(value)} keys; the limit is {MAX_METADATA_KEYS}")
    for key, item in value.items():
        if not isinstance(key, str) or not _METADATA_KEY_RE.fullmatch(key):
            raise ValueError(
                f"metadata key {key!r} must be 1-64 letters, digits, '_' or '-', starting with a letter or '_'"
            )
        _check_metadata_value(key, item)
    return value


_METADATA_VALUE_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "maxLength": MAX_METADATA_STRING},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "array", "items": {"type": "string", "maxLength": MAX_METADATA_STRING},
         "maxItems": MAX_METADATA_LIST},
    ]
}
METADATA_JSON_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {
            "type": "object",
            "maxProperties": MAX_METADATA_KEYS,
            "propertyNames": {"pattern": f"^{METADATA_KEY_PATTERN}$"},
            "additionalProperties": _METADATA_VALUE_SCHEMA,
        },
        {"type": "null"},
    ]
}
Metadata = Annotated[dict[str, Any] | None, WithJsonSchema(METADATA_JSON_SCHEMA)]


class UploadEvent(_Frozen):
    """Value of a record on ``documents.uploads``; the key is ``document_id``.

    A tombstone (same key, null value) deletes the document.
    """

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"document_id": "invoice-42", "blob_uri": "file:///data/blobs/invoice-42.pdf"},
                {
                    "document_id": "contracts/2026/a.pdf",
                    "blob_uri": "https://acct.blob.core.windows.net/docs/contracts/2026/a.pdf",
                    "filename": "a.pdf",
                    "content_type": "application/pdf",
                    "metadata": {"tenant": "acme"},
                    "schema_version": 1,
                },
            ]
        },
    )

    document_id: DocumentId = Field(description="Stable id of the document; must equal the record key.")
    blob_uri: str = Field(
        description="file:// under the configured root, or an allowlisted Azure blob URL, without a query string.",
        max_length=4096,
    )
    filename: str | None = Field(default=None, max_length=1024)
    content_type: str | None = Field(default=None, max_length=255)
    metadata: Metadata = Field(
        default=None,
        description="Copied into every page's payload; values: string, number, boolean or list of strings.",
    )
    schema_version: int = SCHEMA_VERSION

    _v_schema = field_validator("schema_version")(_check_schema_version)
    _v_metadata = field_validator("metadata")(check_metadata)

    @field_validator("blob_uri")
    @classmethod
    def _blob_uri_scheme(cls, value: str) -> str:
        if not (value.startswith("file://") or value.startswith("https://") or value.startswith("http://")):
            raise ValueError("blob_uri must be a file://, https:// or (emulator) http:// URI")
        if "?" in value or "#" in value:
            # A SAS signature in an event would be stored, logged and served with the
            # document; credentials come from settings, never from events.
            raise ValueError("blob_uri must not carry a query string or fragment (SAS tokens belong in settings)")
        return value

    def display_name(self) -> str:
        if self.filename:
            return self.filename
        return uri_basename(self.blob_uri)


class DocumentRef(_Frozen):
    """What every downstream message knows about the document it belongs to."""

    document_id: str
    version: int = Field(ge=0, description="Offset of the upload (or tombstone) record on the uploads topic.")
    filename: str | None = None
    blob_uri: str | None = None
    metadata: Metadata = None

    _v_metadata = field_validator("metadata")(check_metadata)
    _v_blob_uri = field_validator("blob_uri")(_without_query)


class PageTask(_Frozen):
    """One rendered page on ``documents.pages`` (key: document_id)."""

    type: Literal["page"] = "page"
    schema_version: int = SCHEMA_VERSION
    document: DocumentRef
    page_number: int = Field(ge=1)
    total_pages: int = Field(ge=1)
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    image_format: Literal["jpeg", "png"] = "jpeg"
    # Exactly one of the two: the encoded image inline, or a claim-check reference
    # to a blob holding it when it is too big for the topic.
    image_b64: str | None = None
    image_ref: str | None = None

    _v_schema = field_validator("schema_version")(_check_schema_version)

    def image_bytes(self) -> bytes:
        if self.image_b64 is None:
            raise ValueError("page image travels by reference; resolve image_ref through the blob store")
        return base64.b64decode(self.image_b64)


class PageFailed(_Frozen):
    """A page that could not be rendered or embedded; the rest of its document goes on."""

    type: Literal["page_failed"] = "page_failed"
    schema_version: int = SCHEMA_VERSION
    document: DocumentRef
    page_number: int = Field(ge=1)
    total_pages: int = Field(ge=1)
    stage: str
    error_type: str
    message: str


class DocumentDeleted(_Frozen):
    """A tombstone on the uploads topic, carried down to the sink in order with the pages."""

    type: Literal["document_deleted"] = "document_deleted"
    schema_version: int = SCHEMA_VERSION
    document: DocumentRef


class DocumentFailed(_Frozen):
    """The latest version of a document produced no pages at all (broken file, missing blob...)."""

    type: Literal["document_failed"] = "document_failed"
    schema_version: int = SCHEMA_VERSION
    document: DocumentRef
    stage: str
    error_type: str
    message: str


class PageVectors(_Frozen):
    """One page's multivector on ``documents.vectors``: float16, real tokens only.

    ``image_token_start``, ``grid_rows`` and ``grid_cols`` (all set or all absent) say
    where the page's image tokens sit: ``grid_rows x grid_cols`` tokens, row-major,
    from ``image_token_start``. The sink mean-pools them by row and by column for
    first-stage search; messages without them are still valid.
    """

    type: Literal["page_vectors"] = "page_vectors"
    schema_version: int = SCHEMA_VERSION
    document: DocumentRef
    page_number: int = Field(ge=1)
    total_pages: int = Field(ge=1)
    model: str
    dim: int = Field(ge=1)
    num_tokens: int = Field(ge=1)
    dtype: Literal["float16"] = "float16"
    vectors_b64: str
    image_token_start: int | None = Field(default=None, ge=0)
    grid_rows: int | None = Field(default=None, ge=1)
    grid_cols: int | None = Field(default=None, ge=1)

    _v_schema = field_validator("schema_version")(_check_schema_version)

    @model_validator(mode="after")
    def _grid_fits(self) -> PageVectors:
        parts = (self.image_token_start, self.grid_rows, self.grid_cols)
        if all(part is None for part in parts):
            return self
        if any(part is None for part in parts):
            raise ValueError("image_token_start, grid_rows and grid_cols must be given together")
        assert self.image_token_start is not None and self.grid_rows is not None and self.grid_cols is not None
        if self.image_token_start + self.grid_rows * self.grid_cols > self.num_tokens:
            raise ValueError(
                f"image grid {self.grid_rows}x{self.grid_cols} from token {self.image_token_start} "
                f"does not fit in {self.num_tokens} tokens"
            )
        return self

    @classmethod
    def from_array(
        cls,
        *,
        document: DocumentRef,
        page_number: int,
        total_pages: int,
        model: str,
        array: np.ndarray,
        image_grid: tuple[int, int, int] | None = None,
    ) -> PageVectors:
        """``image_grid``: (image_token_start, grid_rows, grid_cols) when the model reported one.

        The embedder's output check, the one place its vectors are validated: what goes on
        the topic is float16, so that is what is checked (a float32 value past float16's
        range would become inf). Raises ValueError for an empty array or NaN/inf."""
        if array.ndim != 2 or array.shape[0] == 0:
            raise ValueError(f"expected a non-empty (tokens, dim) array, got shape {array.shape}")
        with np.errstate(over="ignore"):
            half = np.ascontiguousarray(array, dtype="<f2")
        if not np.isfinite(half).all():
            raise ValueError("page vectors contain NaN or inf (in float16)")
        start, rows, cols = image_grid if image_grid is not None else (None, None, None)
        return cls(
            document=document,
            page_number=page_number,
            total_pages=total_pages,
            model=model,
            dim=int(half.shape[1]),
            num_tokens=int(half.shape[0]),
            vectors_b64=base64.b64encode(half.tobytes()).decode("ascii"),
            image_token_start=start,
            grid_rows=rows,
            grid_cols=cols,
        )

    @cached_property
    def _array(self) -> np.ndarray:
        # Decoded once per message: the sink validates and then stores the same array.
        raw = base64.b64decode(self.vectors_b64)
        array = np.frombuffer(raw, dtype="<f2").reshape(self.num_tokens, self.dim)
        array.flags.writeable = False
        return array

    def to_array(self) -> np.ndarray:
        return self._array


# What the pages topic (splitter -> embedder) and the vectors topic (embedder -> sink) carry.
PageMessage: TypeAlias = PageTask | PageFailed | DocumentDeleted | DocumentFailed
VectorsMessage: TypeAlias = PageVectors | PageFailed | DocumentDeleted | DocumentFailed
# The same unions, told apart by their ``type`` field (decoding, JSON Schema).
PAGE_MESSAGE_SCHEMA = Annotated[PageMessage, Field(discriminator="type")]
VECTORS_MESSAGE_SCHEMA = Annotated[VectorsMessage, Field(discriminator="type")]
PAGE_MESSAGE: TypeAdapter[PageMessage] = TypeAdapter(PAGE_MESSAGE_SCHEMA)
VECTORS_MESSAGE: TypeAdapter[VectorsMessage] = TypeAdapter(VECTORS_MESSAGE_SCHEMA)


class DocumentIndexed(_Frozen):
    """Published on ``documents.indexed`` when every page of a version is settled."""

    type: Literal["document_indexed"] = "document_indexed"
    schema_version: int = SCHEMA_VERSION
    document_id: str
    version: int
    state: Literal["complete", "partial", "failed", "deleted"]
    total_pages: int
    indexed_pages: int
    failed_pages: list[int] = Field(default_factory=list)
    model: str | None = None
    # The upload's metadata (a delete keeps the metadata the document had), so a
    # consumer can route by tenant without a lookup.
    metadata: Metadata = None
    at: datetime = Field(default_factory=utcnow)


class DeadLetter(_Frozen):
    """Everything a stage could not process, with enough to act on it and redrive it."""

    type: Literal["dead_letter"] = "dead_letter"
    schema_version: int = SCHEMA_VERSION
    stage: str
    error_type: str
    message: str
    source_topic: str
    source_partition: int | None = None
    source_offset: int | None = None
    original_key: str | None = None
    original_value: str | None = None
    original_value_b64: str | None = Field(
        default=None, description="Set instead of original_value when the value is not UTF-8."
    )
    document_id: str | None = None
    version: int | None = None
    page_number: int | None = None
    failed_at: datetime = Field(default_factory=utcnow)

    @field_validator("message", "original_value")
    @classmethod
    def _redact_queries(cls, value: str | None) -> str | None:
        # A refused event may carry a SAS signature; the dead letter must not keep it.
        return redact_uris_in_text(value) if value is not None else None

    def original_value_bytes(self) -> bytes | None:
        if self.original_value_b64 is not None:
            return base64.b64decode(self.original_value_b64)
        if self.original_value is not None:
            return self.original_value.encode("utf-8")
        return None


class DocumentRecord(BaseModel):
    """The sink's per-document record: the read model behind ``GET /documents``."""

    model_config = ConfigDict(extra="ignore")

    document_id: str
    version: int
    state: Literal["indexing", "complete", "partial", "failed", "deleted"]
    filename: str | None = None
    blob_uri: str | None = None
    model: str | None = None
    total_pages: int = 0
    indexed_pages: list[int] = Field(default_factory=list)
    failed_pages: list[int] = Field(default_factory=list)
    embedding_dimension: int | None = None
    # Most real tokens of any indexed page (a replay leaves it unchanged).
    tokens_per_page: int | None = None
    error: str | None = None
    metadata: dict[str, Any] | None = None
    updated_at: datetime = Field(default_factory=utcnow)

    # Records written before queries were refused may still hold one: never serve it.
    _v_blob_uri = field_validator("blob_uri")(_without_query)
    _v_filename = field_validator("filename")(_name_without_query)

    @property
    def settled(self) -> bool:
        return self.total_pages > 0 and len(self.indexed_pages) + len(self.failed_pages) >= self.total_pages
