"""Decoding raw Kafka records into contracts, with errors a person can act on."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from colstream.schemas.errors import PipelineError
from colstream.schemas.events import (
    PAGE_MESSAGE,
    VECTORS_MESSAGE,
    DocumentIndexed,
    PageMessage,
    UploadEvent,
    VectorsMessage,
)
from colstream.schemas.ids import DOCUMENT_ID_RULE, is_valid_document_id


class InvalidRecord(PipelineError, ValueError):
    """A record that does not decode into its topic's contract: it goes to the dead-letter topic."""


def _summarise(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def _load_json(value: bytes) -> Any:
    try:
        return json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRecord("InvalidJSON", f"value is not valid UTF-8 JSON: {exc}") from exc


def decode_upload(key: str | None, value: bytes | None) -> UploadEvent | None:
    """Return the upload event, or None for a tombstone (a delete of ``key``)."""
    if value is None:
        if not key:
            raise InvalidRecord("MissingKey", "tombstone without a key: nothing to delete")
        if not is_valid_document_id(key):
            # The same id rule as uploads: a near-miss key must not delete another document.
            raise InvalidRecord("InvalidKey", f"tombstone key is not a document id: {DOCUMENT_ID_RULE}")
        return None
    data = _load_json(value)
    if not isinstance(data, dict):
        raise InvalidRecord("InvalidEvent", f"upload event must be a JSON object, got {type(data).__name__}")
    if "schema_version" in data and data["schema_version"] != 1:
        raise InvalidRecord(
            "UnsupportedSchemaVersion",
            f"unsupported schema_version {data['schema_version']!r}; this build understands [1]",
        )
    try:
        event = UploadEvent.model_validate(data)
    except ValidationError as exc:
        raise InvalidRecord("InvalidEvent", f"invalid upload event: {_summarise(exc)}") from exc
    if key is None:
        raise InvalidRecord(
            "MissingKey", "upload record has no key; key it by document_id so versions stay ordered"
        )
    if key != event.document_id:
        raise InvalidRecord(
            "KeyMismatch",
            f"record key {key!r} does not match document_id {event.document_id!r}; "
            "key uploads by document_id so a document always lands on one partition",
        )
    return event


def decode_page_message(value: bytes | None) -> PageMessage:
    """A pages-topic record: a page task, or a page/document failure or delete passing through."""
    if value is None:
        raise InvalidRecord("UnexpectedTombstone", "null value on the pages topic")
    data = _load_json(value)
    try:
        return PAGE_MESSAGE.validate_python(data)
    except ValidationError as exc:
        raise InvalidRecord("InvalidPageMessage", f"invalid pages-topic message: {_summarise(exc)}") from exc


def decode_vectors(value: bytes | None) -> VectorsMessage:
    """A vectors-topic record: page vectors, or a page/document failure or delete passing through."""
    if value is None:
        raise InvalidRecord("UnexpectedTombstone", "null value on the vectors topic")
    data = _load_json(value)
    try:
        return VECTORS_MESSAGE.validate_python(data)
    except ValidationError as exc:
        raise InvalidRecord("InvalidVectorsMessage", f"invalid vectors-topic message: {_summarise(exc)}") from exc


def decode_indexed(value: bytes | None) -> DocumentIndexed:
    """A ``documents.indexed`` record: one document version settled (or deleted)."""
    if value is None:
        raise InvalidRecord("UnexpectedTombstone", "null value on the indexed topic")
    data = _load_json(value)
    try:
        return DocumentIndexed.model_validate(data)
    except ValidationError as exc:
        raise InvalidRecord("InvalidIndexedEvent", f"invalid indexed-topic event: {_summarise(exc)}") from exc


def encode(model: Any) -> bytes:
    return model.model_dump_json(exclude_none=True).encode("utf-8")
