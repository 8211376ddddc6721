"""The server store's side of a migration, on qdrant-client's local mode (it keeps aliases)
and on the real Qdrant server (skipped where its binary is absent): an index pinned by name
with records of its own, the alias switched in one request, the old index dropped only once
the alias serves another."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qdrant_client import QdrantClient

from colstream.infra.settings import QdrantSettings
from colstream.infra.vectorstore import IndexModel, PagePoint, index_collection_name
from colstream.infra.vectorstore_qdrant import QdrantServerVectorStore, drop_index, point_alias
from colstream.migration.core import IndexRef, target_records_name
from colstream.migration.embedded import QdrantIndexAdmin
from colstream.schemas.events import DocumentRecord

DIM = 8
OLD = IndexModel(family="colqwen2", model_id="old", revision="1", dim=DIM)
NEW = IndexModel(family="colpali", model_id="new", revision="2", dim=DIM)


class Shared:
    """One local-mode client for every store (local mode locks its folder); close is a no-op."""

    def __init__(self, client: QdrantClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def close(self) -> None:
        pass


def page(model: IndexModel, doc: str) -> PagePoint:
    vectors = np.random.default_rng(2).standard_normal((3, DIM)).astype(np.float32)
    return PagePoint(document_id=doc, version=1, page_number=1, total_pages=1, filename=None, blob_uri=None,
                     model=model.label, vectors=vectors)


# "server" is the session's Qdrant server: the full suite runs it, the quick tier does not.
@pytest.fixture(params=["local", pytest.param("server", marks=pytest.mark.slow)])
def client(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QdrantClient]:
    if request.param == "local":
        opened = QdrantClient(path=str(tmp_path / "local"))
    else:
        opened = QdrantClient(url=request.getfixturevalue("qdrant_url"))
    yield opened
    opened.close()


def test_a_pinned_collection_with_its_records_becomes_what_the_alias_serves(client: QdrantClient) -> None:
    shared: Any = Shared(client)
    unique = f"m{time.monotonic_ns()}"  # the session's server is shared by other tests
    settings = QdrantSettings(
        url="http://unused:6333", collection=f"{unique}_pages", records_collection=f"{unique}_docs"
    )
    serving = QdrantServerVectorStore(settings, shared)
    serving.ensure_collections(model=OLD)
    serving.upsert_pages([page(OLD, "a")])
    serving.put_records([DocumentRecord(document_id="a", version=1, state="complete")])
    source = IndexRef(serving.index_name, serving.records_name, OLD)
    assert source.records == settings.records_collection

    name = index_collection_name(settings.collection, NEW)
    admin = QdrantIndexAdmin(settings, client_factory=lambda: shared)
    target_ref = IndexRef(name, target_records_name(settings.records_collection, name), NEW)
    target = admin.open(target_ref)
    target.ensure_collections(model=NEW)
    target.upsert_pages([page(NEW, "b")])
    target.put_records([DocumentRecord(document_id="b", version=2, state="complete")])
    # Only this test's alias: the session's server holds other tests' aliases too.
    aliases = {a.alias_name: a.collection_name for a in client.get_aliases().aliases if a.alias_name.startswith(unique)}
    assert aliases == {settings.collection: source.name}  # pinned: the alias did not move
    assert [r.document_id for r in target.list_records()] == ["b"]
    assert [r.document_id for r in serving.list_records()] == ["a"]
    with pytest.raises(RuntimeError):
        drop_index(shared, settings.collection, source.name, source.records)

    admin.point_alias(target_ref)
    reopened = QdrantServerVectorStore(settings, shared)
    assert reopened.index_name == name and reopened.index_model() == NEW
    assert reopened.records_name == target_ref.records
    assert [r.document_id for r in reopened.list_records()] == ["b"]
    admin.drop(source)
    assert not client.collection_exists(source.name) and not client.collection_exists(source.records)
    with pytest.raises(RuntimeError):
        point_alias(shared, settings.collection, source.name)
