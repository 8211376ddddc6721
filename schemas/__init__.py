"""The shared vocabulary: event contracts that producers, consumers and tools all speak."""

from colstream.schemas.codec import InvalidRecord, decode_pipeline, decode_upload, decode_vectors, encode
from colstream.schemas.envelope import Envelope, RecordPosition
from colstream.schemas.events import (
    SCHEMA_VERSION,
    DeadLetter,
    DocumentDeleted,
    DocumentFailed,
    DocumentIndexed,
    DocumentRecord,
    DocumentRef,
    PageFailed,
    PageTask,
    PageVectors,
    UploadEvent,
)

__all__ = [
    "SCHEMA_VERSION",
    "DeadLetter",
    "DocumentDeleted",
    "DocumentFailed",
    "DocumentIndexed",
    "DocumentRecord",
    "DocumentRef",
    "Envelope",
    "InvalidRecord",
    "PageFailed",
    "PageTask",
    "PageVectors",
    "RecordPosition",
    "UploadEvent",
    "decode_pipeline",
    "decode_upload",
    "decode_vectors",
    "encode",
]
