"""Reading the sink's per-document record as the answer to a request.

The API never sees the pipeline directly: it publishes a record, learns that
record's offset (the document's version) and then watches the sink's
:class:`DocumentRecord` until it reaches that version. These are the pure rules
for "is it done" and "what do we tell the client".
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from colstream.api.failures import public_blob_uri, scrub_paths
from colstream.api.models import DocumentDetail, DocumentSummary, IngestResponse
from colstream.schemas.events import DocumentRecord

SETTLED_STATES = frozenset({"complete", "partial", "failed", "deleted"})

UploadKind = Literal["pdf", "image"]


def upload_finished(record: DocumentRecord | None, version: int | None, published_at: datetime) -> bool:
    """The sink has settled this upload, or something newer replaced it."""
    if record is None or record.state not in SETTLED_STATES:
        return False
    if version is not None:
        return record.version >= version
    # Without an offset the version is unknown; the record's clock is the next best fence.
    return record.updated_at >= published_at


def delete_applied(record: DocumentRecord | None, version: int | None) -> bool:
    """The sink has processed this tombstone (or a later upload already replaced it)."""
    if record is None:
        return True
    if version is not None:
        # The tombstone's offset is the deleted record's version; anything higher came after it.
        return record.version >= version
    return record.state == "deleted"


def summary(record: DocumentRecord) -> DocumentSummary:
    return DocumentSummary(
        document_id=record.document_id,
        filename=record.filename,
        total_pages=record.total_pages,
        embedding_dimension=record.embedding_dimension,
        state=record.state,
        version=record.version,
        indexed_pages=len(record.indexed_pages),
        failed_pages=sorted(record.failed_pages),
        updated_at=record.updated_at,
    )


def detail(record: DocumentRecord) -> DocumentDetail:
    return DocumentDetail(
        document_id=record.document_id,
        version=record.version,
        state=record.state,
        filename=record.filename,
        # Never a server path: a local blob is named relative to the blob root.
        blob_uri=public_blob_uri(record.blob_uri),
        model=record.model,
        total_pages=record.total_pages,
        indexed_pages=sorted(record.indexed_pages),
        failed_pages=sorted(record.failed_pages),
        embedding_dimension=record.embedding_dimension,
        tokens_per_page=record.tokens_per_page,
        metadata=record.metadata,
        error=scrub_paths(record.error) if record.error else record.error,
        updated_at=record.updated_at,
    )


def _pages(count: int) -> str:
    return f"{count} page" if count == 1 else f"{count} pages"


def ingest_outcome(
    record: DocumentRecord, version: int | None, kind: UploadKind, filename: str
) -> tuple[int, IngestResponse]:
    """HTTP status and body for a settled upload."""
    what = "PDF" if kind == "pdf" else "image"
    indexed = len(record.indexed_pages)
    failed = sorted(record.failed_pages)
    status = 200
    if version is not None and record.version > version:
        status = 409
        message = (
            f"this upload (version {version}) was superseded by version {record.version} "
            f"({record.state}) before it finished"
        )
    elif record.state == "complete":
        message = (
            f"Successfully ingested PDF with {_pages(record.total_pages)}"
            if kind == "pdf"
            else "Successfully ingested image"
        )
    elif record.state == "partial":
        message = f"Ingested {what} partially: {indexed} of {_pages(record.total_pages)} indexed, failed pages {failed}"
    elif record.state == "failed":
        status = 422
        message = f"Ingestion of the {what} failed: {scrub_paths(record.error or 'no page could be processed')}"
    else:
        status = 409
        message = f"the document is {record.state} (version {record.version})"
    return status, IngestResponse(
        document_id=record.document_id,
        filename=record.filename or filename,
        total_pages=record.total_pages,
        embedding_dimension=record.embedding_dimension,
        tokens_per_page=record.tokens_per_page,
        message=message,
        state=record.state,
        version=record.version,
        indexed_pages=indexed,
        failed_pages=failed,
        error=scrub_paths(record.error) if record.error else record.error,
    )
