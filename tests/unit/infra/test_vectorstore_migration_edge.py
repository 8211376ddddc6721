"""What a migration needs from the embedded store: an index pinned by name with records of its
own, the alias moved in one step, and an index dropped only once the alias serves another."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from colstream.infra.settings import QdrantSettings
from colstream.infra.vectorstore import IndexModel, PagePoint, index_collection_name
from colstream.infra.vectorstore_edge import EdgeVectorStore, aliases, drop_index, point_alias
from colstream.schemas.events import DocumentRecord

DIM = 16
OLD = IndexModel(family="colqwen2", model_id="old", revision="1", dim=DIM)
NEW = IndexModel(family="colpali", model_id="new", revision="2", dim=DIM)


def page(model: IndexModel, doc: str) -> PagePoint:
    vectors = np.random.default_rng(1).standard_normal((4, DIM)).astype(np.float16)
    return PagePoint(document_id=doc, version=1, page_number=1, total_pages=1, filename=None, blob_uri=None,
                     model=model.label, vectors=vectors)


def test_a_pinned_index_has_its_own_records_and_the_alias_moves_to_it(tmp_path: Path) -> None:
    settings = QdrantSettings(path=tmp_path / "q")
    serving = EdgeVectorStore(settings)
    serving.ensure_collections(model=OLD)
    serving.upsert_pages([page(OLD, "a")])
    serving.put_records([DocumentRecord(document_id="a", version=1, state="complete")])
    source_name = serving.index_name
    assert serving.records_name == settings.records_collection

    target_name = index_collection_name(settings.collection, NEW)
    target = EdgeVectorStore(settings, index=target_name, records=f"records--{target_name}")
    target.ensure_collections(model=NEW)
    target.upsert_pages([page(NEW, "b")])
    target.put_records([DocumentRecord(document_id="b", version=2, state="complete")])
    # the alias still serves the source; each index keeps its own records
    assert aliases(settings)[settings.collection] == source_name
    assert [r.document_id for r in serving.list_records()] == ["a"]
    assert [r.document_id for r in target.list_records()] == ["b"]
    with pytest.raises(RuntimeError):
        drop_index(settings, source_name, serving.records_name)  # still what the alias serves
    target.close()

    point_alias(settings, target_name)
    serving.close()
    reopened = EdgeVectorStore(settings)  # through the alias: the target, its model and its records
    assert reopened.index_name == target_name and reopened.index_model() == NEW
    assert reopened.records_name == f"records--{target_name}"
    assert [r.document_id for r in reopened.list_records()] == ["b"]
    assert [p["document_id"] for _, p in reopened.search(np.ones((1, DIM), dtype=np.float32))] == ["b"]
    reopened.close()

    drop_index(settings, source_name, settings.records_collection)
    assert not (tmp_path / "q" / source_name).exists()
    assert not (tmp_path / "q" / settings.records_collection).exists()
    with pytest.raises(RuntimeError):
        point_alias(settings, source_name)  # gone
