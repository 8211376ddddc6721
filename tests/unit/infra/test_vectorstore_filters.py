"""Metadata in page payloads and filtered search/count, on Edge, on qdrant-client's local mode and
on a real Qdrant server (skipped where no server binary or QDRANT_URL is available)."""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qdrant_client import QdrantClient

from colstream.infra.settings import QdrantSettings
from colstream.infra.vectorstore import PagePoint, UnknownFilterKey, VectorStore
from colstream.infra.vectorstore_edge import EdgeVectorStore
from colstream.infra.vectorstore_qdrant import QdrantServerVectorStore

DIM = 16


def page(document_id: str, metadata: dict[str, Any], seed: int) -> PagePoint:
    vectors = np.random.default_rng(seed).standard_normal((4, DIM)).astype(np.float32)
    return PagePoint(document_id=document_id, version=1, page_number=1, total_pages=1, filename=None,
                     blob_uri=None, model="m", vectors=vectors, metadata=metadata)


# The "server" store is the session's Qdrant server: the full suite runs it, the quick tier does not.
@pytest.fixture(params=["edge", "client-local", pytest.param("server", marks=pytest.mark.slow)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorStore]:
    settings = QdrantSettings(path=tmp_path / "q", indexed_metadata=["tenant", "tags"])
    opened: VectorStore
    if request.param == "edge":
        opened = EdgeVectorStore(settings)
    elif request.param == "client-local":
        opened = QdrantServerVectorStore(settings, client=QdrantClient(location=":memory:"))
    else:
        url = request.getfixturevalue("qdrant_url")
        collection = f"filters_{uuid.uuid4().hex[:12]}"
        opened = QdrantServerVectorStore(
            settings.model_copy(update={"url": url, "path": None, "collection": collection})
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opened.ensure_collections(dim=DIM)
    opened.upsert_pages([
        page("a1", {"tenant": "acme", "tags": ["red", "blue"]}, 1),
        page("a2", {"tenant": "acme", "tags": ["green"]}, 2),
        page("g1", {"tenant": "globex", "tags": ["red"]}, 3),
    ])
    yield opened
    opened.close()


def found(store: VectorStore, filter_: dict[str, Any]) -> set[str]:
    query = np.random.default_rng(9).standard_normal((2, DIM)).astype(np.float32)
    return {payload["document_id"] for _, payload in store.search(query, limit=10, filter=filter_)}


def test_payload_holds_the_metadata(store: VectorStore) -> None:
    (payload,) = store.page_payloads("g1")
    assert payload["metadata"] == {"tenant": "globex", "tags": ["red"]}


@pytest.mark.parametrize(
    ("filter_", "expected"),
    [
        ({"tenant": "acme"}, {"a1", "a2"}),
        ({"tenant": ["globex", "initech"]}, {"g1"}),
        ({"tags": "red"}, {"a1", "g1"}),
        ({"tenant": "acme", "tags": "red"}, {"a1"}),
        ({"document_id": ["a2", "g1"], "tenant": "acme"}, {"a2"}),
        ({"tenant": []}, set()),
    ],
)
def test_search_and_count_follow_the_filter(store: VectorStore, filter_: dict[str, Any], expected: set[str]) -> None:
    assert found(store, filter_) == expected
    assert store.count_pages(filter=filter_) == len(expected)


def test_unknown_filter_key_is_refused_by_name(store: VectorStore) -> None:
    with pytest.raises(UnknownFilterKey, match="'colour'"):
        found(store, {"colour": "red"})


def test_reupload_replaces_the_metadata_on_every_page(store: VectorStore) -> None:
    store.upsert_pages([page("a1", {"tenant": "globex"}, 1)])
    assert found(store, {"tenant": "globex"}) == {"g1", "a1"}
    (payload,) = store.page_payloads("a1")
    assert payload["metadata"] == {"tenant": "globex"}


@pytest.mark.slow  # the session's Qdrant server
def test_a_server_indexes_the_tenant_as_the_tenant_key(request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("qdrant_url")
    collection = f"tenant_{uuid.uuid4().hex[:12]}"
    settings = QdrantSettings(url=url, collection=collection, indexed_metadata=["tenant", "tags"])
    store = QdrantServerVectorStore(settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        store.ensure_collections(dim=DIM)
    store.upsert_pages([page("a1", {"tenant": "acme"}, 1)])
    client = QdrantClient(url=url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        alias = next(a for a in client.get_aliases().aliases if a.alias_name == settings.collection)
        schema = client.get_collection(alias.collection_name).payload_schema
    tenant = schema["metadata.tenant"]
    assert tenant.params is not None and getattr(tenant.params, "is_tenant", None) is True
    assert "metadata.tags" in schema
    store.close()
