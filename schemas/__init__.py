"""The shared vocabulary: event contracts that producers, consumers and tools all speak."""

from colstream.schemas.codec import InvalidRecord, decode_page_message, decode_upload, decode_vectors, encode
from colstream.schemas.errors import PipelineError
from colstream.schemas.events import (
    SCHEMA_VERSION,
    DeadLetter,
    DocumentDeleted,
    DocumentFailed,
    DocumentIndexed,
    DocumentRecord,
    DocumentRef,
    PageFailed,
    PageMessage,
    PageTask,
    PageVectors,
    UploadEvent,
    VectorsMessage,
)

__all__ = [
    "SCHEMA_VERSION",
    "DeadLetter",
    "DocumentDeleted",
    "DocumentFailed",
    "DocumentIndexed",
    "DocumentRecord",
    "DocumentRef",
    "InvalidRecord",
    "PageFailed",
    "PageMessage",
    "PageTask",
    "PageVectors",
    "PipelineError",
    "UploadEvent",
    "VectorsMessage",
    "decode_page_message",
    "decode_upload",
    "decode_vectors",
    "encode",
]
