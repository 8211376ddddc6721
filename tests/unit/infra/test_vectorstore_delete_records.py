"""Expired tombstone records can be removed from both store backends (``colstream gc``)."""

from __future__ import annotations

from colstream.infra.vectorstore import VectorStore
from colstream.schemas.events import DocumentRecord
from tests.unit.infra.test_vectorstore import store, store_factory

__all__ = ["store", "store_factory"]


def test_delete_records_forgets_only_the_named_documents(store: VectorStore) -> None:
    gone = DocumentRecord(document_id="gone/a", version=7, state="deleted")
    kept = DocumentRecord(document_id="kept", version=2, state="complete", total_pages=1, indexed_pages=[1])
    store.put_records([gone, kept])
    store.delete_records(["gone/a", "never-existed"])
    assert store.get_records(["gone/a", "kept"]) == {"kept": kept}
    assert [r.document_id for r in store.list_records()] == ["kept"]
    store.delete_records([])
