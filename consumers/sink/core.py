"""The sink's pure core: latest-wins writes of page vectors and document records.

Rule: for each document the index holds exactly the pages of the newest version
the sink has seen, where a version is the offset of the upload (or tombstone) on
the uploads topic. So, per message, in the order of its partition:

* older than the document's record -> dropped, never written (a delete or a
  re-upload overtook it);
* newer -> a new version starts: pages of older versions are purged, the record
  restarts at that version;
* equal -> written again; point ids are deterministic, so replays are harmless.

Writes happen in this order within one batch: purge older versions, upsert the
new pages, then persist the records. A crash between any two steps replays the
batch from the last commit and converges to the same state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

from colstream.consumers.sink.limits import WriteLimits, point_size, split_by_bytes
from colstream.infra.vectorstore import PagePoint, PatchGrid
from colstream.schemas import (
    DocumentDeleted,
    DocumentFailed,
    DocumentIndexed,
    DocumentRecord,
    PageFailed,
    PageVectors,
)
from colstream.schemas.events import utcnow

VectorsMessage: TypeAlias = PageVectors | PageFailed | DocumentDeleted | DocumentFailed


class PageWriter(Protocol):
    """The part of the vector store the sink needs."""

    def upsert_pages(self, points: Sequence[PagePoint]) -> None: ...

    def delete_documents(self, purges: Sequence[tuple[str, int | None]]) -> None: ...

    def get_records(self, document_ids: Sequence[str]) -> dict[str, DocumentRecord]: ...

    def put_records(self, records: Sequence[DocumentRecord]) -> None: ...


@dataclass
class SinkOutcome:
    written_pages: int = 0
    dropped_stale: int = 0
    completed: list[DocumentIndexed] = field(default_factory=list)
    # Blob URIs of versions a newer version (or a delete) replaced in this batch, per document,
    # and the records that settled in it: what the blob janitor may release once they are durable.
    superseded: dict[str, set[str]] = field(default_factory=dict)
    settled: list[DocumentRecord] = field(default_factory=list)


@dataclass
class _DocumentPlan:
    record: DocumentRecord | None
    was_settled_at: int | None  # version the persisted record was already settled at
    purge_all: bool = False
    purge_below: int | None = None
    upserts: dict[int, PagePoint] = field(default_factory=dict)
    touched: bool = False
    superseded: set[str] = field(default_factory=set)

    def replace(self, old: DocumentRecord | None, new_version: int, new_blob_uri: str | None) -> None:
        if old is not None and old.version < new_version and old.blob_uri and old.blob_uri != new_blob_uri:
            self.superseded.add(old.blob_uri)


def _patch_grid(message: PageVectors) -> PatchGrid | None:
    # Messages from producers that do not report a grid are stored with the store's fallback rule.
    if message.image_token_start is None or message.grid_rows is None or message.grid_cols is None:
        return None
    return PatchGrid(start=message.image_token_start, rows=message.grid_rows, cols=message.grid_cols)


def _settled_state(record: DocumentRecord) -> str:
    if not record.indexed_pages:
        return "failed"
    return "partial" if record.failed_pages else "complete"


class SinkCore:
    def __init__(self, store: PageWriter, limits: WriteLimits | None = None) -> None:
        self.store = store
        # Requests are split to stay under the server's body limit (None: one upsert).
        self.limits = limits
        self.upsert_calls = 0

    def apply(self, messages: Sequence[VectorsMessage]) -> SinkOutcome:
        outcome = SinkOutcome()
        doc_ids = list(dict.fromkeys(m.document.document_id for m in messages))
        existing = self.store.get_records(doc_ids)
        plans = {
            d: _DocumentPlan(
                record=existing.get(d),
                was_settled_at=(
                    existing[d].version
                    if d in existing and (existing[d].settled or existing[d].state in ("deleted", "failed"))
                    else None
                ),
            )
            for d in doc_ids
        }
        for message in messages:
            plan = plans[message.document.document_id]
            if not self._plan_message(plan, message):
                outcome.dropped_stale += 1

        # 1. purge older versions / deleted documents
        purges = [
            (doc_id, None if plan.purge_all else plan.purge_below)
            for doc_id, plan in plans.items()
            if plan.purge_all or plan.purge_below is not None
        ]
        if purges:
            self.store.delete_documents(purges)
        # 2. write the pages of the surviving versions
        points = [p for plan in plans.values() for p in plan.upserts.values()]
        budget = self.limits.request_budget if self.limits is not None else None
        if points and self.limits is not None and budget is not None:
            # Split by bytes, never rejected whole; pages were fitted one by one before.
            for group in split_by_bytes(points, point_size(self.limits), budget):
                self.store.upsert_pages(group)
                self.upsert_calls += 1
        elif points:
            self.store.upsert_pages(points)
            self.upsert_calls += 1
        outcome.written_pages = len(points)
        # 3. records last: a record never claims pages that are not durable yet
        changed = [plan.record for plan in plans.values() if plan.touched and plan.record is not None]
        for plan in plans.values():
            rec = plan.record
            if rec is None or not plan.touched:
                continue
            if rec.state == "indexing" and rec.settled:
                rec.state = _settled_state(rec)  # type: ignore[assignment]
            if rec.state != "indexing" and plan.was_settled_at != rec.version:
                outcome.settled.append(rec)
                outcome.completed.append(
                    DocumentIndexed(
                        document_id=rec.document_id,
                        version=rec.version,
                        state=rec.state,
                        total_pages=rec.total_pages,
                        indexed_pages=len(rec.indexed_pages),
                        failed_pages=sorted(rec.failed_pages),
                        model=rec.model,
                        metadata=rec.metadata,
                    )
                )
        if changed:
            self.store.put_records(changed)
        outcome.superseded = {doc_id: plan.superseded for doc_id, plan in plans.items() if plan.superseded}
        return outcome

    @staticmethod
    def _plan_message(plan: _DocumentPlan, message: VectorsMessage) -> bool:
        """Fold one message into the document's plan; False when it is stale."""
        ref = message.document
        rec = plan.record
        if rec is not None and ref.version < rec.version:
            return False
        if isinstance(message, DocumentDeleted | DocumentFailed):
            if rec is not None and ref.version == rec.version and rec.state in ("deleted", "failed"):
                return True  # replayed: already applied
            plan.replace(rec, ref.version, ref.blob_uri)
            plan.record = DocumentRecord(
                document_id=ref.document_id,
                version=ref.version,
                state="deleted" if isinstance(message, DocumentDeleted) else "failed",
                filename=ref.filename,
                blob_uri=ref.blob_uri,
                error=None if isinstance(message, DocumentDeleted) else f"{message.error_type}: {message.message}",
                # A tombstone carries no metadata: the document stays its tenant's after a delete.
                metadata=ref.metadata if ref.metadata is not None else (rec.metadata if rec is not None else None),
            )
            plan.purge_all, plan.purge_below = True, None
            plan.upserts.clear()
            plan.touched = True
            return True
        if rec is not None and ref.version == rec.version and rec.state in ("deleted", "failed"):
            return False
        if rec is None or ref.version > rec.version:
            plan.replace(rec, ref.version, ref.blob_uri)
            rec = DocumentRecord(
                document_id=ref.document_id,
                version=ref.version,
                state="indexing",
                filename=ref.filename,
                blob_uri=ref.blob_uri,
                total_pages=message.total_pages,
                metadata=ref.metadata,
            )
            plan.record = rec
            plan.purge_all, plan.purge_below = False, ref.version
            plan.upserts.clear()
        rec.total_pages = message.total_pages
        rec.updated_at = utcnow()
        page = message.page_number
        if isinstance(message, PageVectors):
            plan.upserts[page] = PagePoint(
                document_id=ref.document_id,
                version=ref.version,
                page_number=page,
                total_pages=message.total_pages,
                filename=ref.filename,
                blob_uri=ref.blob_uri,
                model=message.model,
                vectors=message.to_array(),
                grid=_patch_grid(message),
                metadata=ref.metadata,
            )
            if page not in rec.indexed_pages:
                rec.indexed_pages = sorted([*rec.indexed_pages, page])
            if page in rec.failed_pages:
                rec.failed_pages = [p for p in rec.failed_pages if p != page]
            rec.model = message.model
            rec.embedding_dimension = message.dim
            rec.tokens_per_page = max(rec.tokens_per_page or 0, message.num_tokens)
        else:
            if page not in rec.failed_pages and page not in rec.indexed_pages:
                rec.failed_pages = sorted([*rec.failed_pages, page])
        plan.touched = True
        return True
