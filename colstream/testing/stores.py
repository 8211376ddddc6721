"""An in-memory vector store with the :class:`~colstream.infra.vectorstore.VectorStore`
interface: pages and document records in dicts, durable the moment a call returns.

A test can take it down (``down``: every call raises :class:`ConnectionError`, as a
store outage would) or hold its writes (``hold_writes``: a write blocks until the event
is set), and reads what was written from ``points`` and ``records``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from colstream.infra.vectorstore import IndexModel, PagePoint, PayloadFilter
from colstream.schemas import DocumentRecord


@dataclass
class MemoryVectorStore:
    dim: int = 128
    points: dict[tuple[str, int], PagePoint] = field(default_factory=dict)
    records: dict[str, DocumentRecord] = field(default_factory=dict)
    # While True, every call fails as an unreachable store does.
    down: bool = False
    # When set, a write waits for the event first (at most 10 s).
    hold_writes: threading.Event | None = None
    writes: int = 0
    closed: bool = False
    model: IndexModel | None = None

    def _reachable(self) -> None:
        if self.down:
            raise ConnectionError("vector store unreachable")

    def _write(self) -> None:
        self._reachable()
        if self.hold_writes is not None:
            self.hold_writes.wait(10)
        self._reachable()
        self.writes += 1

    def ensure_collections(self, dim: int | None = None, model: IndexModel | None = None) -> None:
        self._reachable()
        if model is not None:
            self.model = model
            self.dim = model.dim
        elif dim is not None:
            self.dim = dim

    def index_model(self) -> IndexModel | None:
        return self.model

    def upsert_pages(self, points: Sequence[PagePoint]) -> None:
        self._write()
        for p in points:
            self.points[(p.document_id, p.page_number)] = p

    def delete_document(self, document_id: str, below_version: int | None = None) -> None:
        self.delete_documents([(document_id, below_version)])

    def delete_documents(self, purges: Sequence[tuple[str, int | None]]) -> None:
        self._write()
        for document_id, below_version in purges:
            for key, p in list(self.points.items()):
                if p.document_id == document_id and (below_version is None or p.version < below_version):
                    del self.points[key]

    def page_payloads(self, document_id: str | None = None) -> list[dict[str, Any]]:
        self._reachable()
        return [p.payload() for p in self.points.values() if document_id in (None, p.document_id)]

    def count_pages(self, document_id: str | None = None, filter: PayloadFilter | None = None) -> int:
        if filter:
            raise NotImplementedError("MemoryVectorStore does not filter on metadata")
        return len(self.page_payloads(document_id))

    def search(
        self,
        query: np.ndarray,
        limit: int = 10,
        document_id: str | None = None,
        prefetch: bool = True,
        filter: PayloadFilter | None = None,
    ) -> list[tuple[float, dict[str, Any]]]:
        """Exact MaxSim over every stored page (no first stage, no metadata filter)."""
        self._reachable()
        if filter:
            raise NotImplementedError("MemoryVectorStore does not filter on metadata")
        q = np.asarray(query, dtype=np.float32).reshape(-1, self.dim)
        scored = [
            (float((q @ p.vectors.astype(np.float32).T).max(axis=1).sum()), p.payload())
            for p in self.points.values()
            if document_id in (None, p.document_id)
        ]
        return sorted(scored, key=lambda hit: -hit[0])[:limit]

    def get_records(self, document_ids: Sequence[str]) -> dict[str, DocumentRecord]:
        self._reachable()
        return {d: self.records[d].model_copy(deep=True) for d in document_ids if d in self.records}

    def put_records(self, records: Sequence[DocumentRecord]) -> None:
        self._write()
        for r in records:
            self.records[r.document_id] = r.model_copy(deep=True)

    def list_records(self) -> list[DocumentRecord]:
        self._reachable()
        return [r.model_copy(deep=True) for r in self.records.values()]

    def delete_records(self, document_ids: Sequence[str]) -> None:
        self._write()
        for d in document_ids:
            self.records.pop(d, None)

    def stats(self) -> dict[str, Any]:
        self._reachable()
        return {"vector_dimension": self.dim, "pages": len(self.points), "documents": len(self.records)}

    def close(self) -> None:
        self.closed = True

    # -- reading back ---------------------------------------------------------------
    def pages_of(self, document_id: str) -> dict[int, int]:
        """page number -> version of every stored page of ``document_id``."""
        return {n: p.version for (d, n), p in sorted(self.points.items()) if d == document_id}
