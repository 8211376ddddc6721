"""Both vector store backends behave the same: Qdrant Edge on disk, qdrant-client local mode."""

from __future__ import annotations

import json
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient

from colstream.infra.settings import QdrantSettings
from colstream.infra.vectorstore import (
    IndexModel,
    IndexModelMismatch,
    InvalidVectorsError,
    PagePoint,
    PatchGrid,
    VectorStore,
    open_vector_store,
    page_point_id,
    pool_rows_and_columns,
)
from colstream.infra.vectorstore_edge import EdgeVectorStore
from colstream.infra.vectorstore_qdrant import QdrantServerVectorStore
from colstream.schemas.events import DocumentRecord

DIM = 16
TOKENS = 24

StoreFactory = Callable[..., VectorStore]


def make_page(
    document_id: str, page_number: int, version: int = 1, total_pages: int = 3, seed: int | None = None
) -> PagePoint:
    default_seed = zlib.crc32(f"{document_id}#{page_number}".encode())
    rng = np.random.default_rng(seed if seed is not None else default_seed)
    return PagePoint(
        document_id=document_id,
        version=version,
        page_number=page_number,
        total_pages=total_pages,
        filename=f"{document_id}.pdf",
        blob_uri=f"file:///blobs/{document_id}.pdf",
        model="colqwen2-test",
        vectors=rng.standard_normal((TOKENS, DIM)).astype(np.float16),
    )


@pytest.fixture(params=["edge", "client-local"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    opened: list[VectorStore] = []

    def factory(**overrides: object) -> VectorStore:
        settings = QdrantSettings(path=tmp_path / "qdrant", **overrides)  # type: ignore[arg-type]
        if request.param == "edge":
            store: VectorStore = EdgeVectorStore(settings)
        else:
            store = QdrantServerVectorStore(settings, client=QdrantClient(location=":memory:"))
        with warnings.catch_warnings():
            # Local mode warns that payload indexes do nothing there.
            warnings.simplefilter("ignore", UserWarning)
            store.ensure_collections(dim=DIM)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def store(store_factory: StoreFactory) -> VectorStore:
    return store_factory()


def test_page_point_id_is_deterministic_and_distinct() -> None:
    assert page_point_id("doc", 1) == page_point_id("doc", 1)
    ids = {page_point_id(doc, page) for doc in ("a", "b", "a/1") for page in (1, 2, 11)}
    assert len(ids) == 9


def test_upsert_is_idempotent_and_payloads_exact(store: VectorStore) -> None:
    pages = [make_page("doc-a", n) for n in (1, 2, 3)]
    store.upsert_pages(pages)
    store.upsert_pages(pages)
    assert store.count_pages() == 3
    payloads = sorted(store.page_payloads("doc-a"), key=lambda p: p["page_number"])
    assert payloads == [
        {
            "document_id": "doc-a",
            "version": 1,
            "page_number": n,
            "total_pages": 3,
            "filename": "doc-a.pdf",
            "blob_uri": "file:///blobs/doc-a.pdf",
            "model": "colqwen2-test",
            "metadata": {},
        }
        for n in (1, 2, 3)
    ]


def test_new_version_overwrites_pages_in_place(store: VectorStore) -> None:
    store.upsert_pages([make_page("doc", n, version=1) for n in (1, 2, 3)])
    store.upsert_pages([make_page("doc", n, version=5, total_pages=2) for n in (1, 2)])
    versions = sorted((p["page_number"], p["version"]) for p in store.page_payloads("doc"))
    assert versions == [(1, 5), (2, 5), (3, 1)]
    store.delete_document("doc", below_version=5)
    assert sorted(p["page_number"] for p in store.page_payloads("doc")) == [1, 2]


def test_delete_document_all_and_below_version(store: VectorStore) -> None:
    store.upsert_pages([make_page("keep", n) for n in (1, 2)])
    store.upsert_pages([make_page("mixed", 1, version=3), make_page("mixed", 2, version=7)])
    store.delete_document("mixed", below_version=7)
    assert [(p["page_number"], p["version"]) for p in store.page_payloads("mixed")] == [(2, 7)]
    store.delete_document("mixed", below_version=7)
    assert store.count_pages("mixed") == 1
    store.delete_document("mixed")
    assert store.count_pages("mixed") == 0
    assert store.count_pages("keep") == 2
    store.delete_document("never-seen")
    assert store.count_pages() == 2


def test_search_finds_the_page_its_own_vectors_came_from(store: VectorStore) -> None:
    pages = [make_page(f"doc-{d}", n) for d in range(4) for n in (1, 2, 3)]
    store.upsert_pages(pages)
    for target in (pages[0], pages[7], pages[11]):
        hits = store.search(target.vectors[:6], limit=3)
        assert len(hits) == 3
        score, payload = hits[0]
        assert (payload["document_id"], payload["page_number"]) == (target.document_id, target.page_number)
        # Cosine MaxSim of a query token against itself is 1.
        assert score == pytest.approx(6.0, abs=0.02)
        assert hits[0][0] > hits[1][0] >= hits[2][0]


def test_search_filtered_by_document(store: VectorStore) -> None:
    pages = [make_page("one", n) for n in (1, 2)] + [make_page("two", n) for n in (1, 2)]
    store.upsert_pages(pages)
    hits = store.search(pages[0].vectors, limit=10, document_id="two")
    assert {payload["document_id"] for _, payload in hits} == {"two"}
    assert len(hits) == 2


def test_nan_vectors_refused_with_clear_error(store: VectorStore) -> None:
    # NaN page vectors are refused at the sink's input check (tests/unit/consumers/sink/test_stage.py);
    # the store refuses a point of another width and a NaN query itself.
    vectors = np.ones((TOKENS, DIM), dtype=np.float32)
    vectors[3, 5] = np.nan
    with pytest.raises(InvalidVectorsError, match="dim"):
        store.upsert_pages([PagePoint("doc", 1, 1, 1, None, None, "m", np.ones((4, DIM + 1), np.float16))])
    with pytest.raises(InvalidVectorsError, match="NaN"):
        store.search(vectors)
    assert store.count_pages() == 0


def test_records_round_trip(store: VectorStore) -> None:
    first = DocumentRecord(
        document_id="doc-a",
        version=3,
        state="partial",
        filename="a.pdf",
        total_pages=3,
        indexed_pages=[1, 3],
        failed_pages=[2],
        embedding_dimension=DIM,
        error="page 2: render timeout",
    )
    second = DocumentRecord(document_id="doc/b", version=9, state="indexing")
    store.put_records([first, second])
    assert store.get_records(["doc-a", "doc/b", "missing"]) == {"doc-a": first, "doc/b": second}
    updated = first.model_copy(update={"state": "complete", "indexed_pages": [1, 2, 3], "failed_pages": []})
    store.put_records([updated])
    assert store.get_records(["doc-a"]) == {"doc-a": updated}
    assert sorted(r.document_id for r in store.list_records()) == ["doc-a", "doc/b"]


def test_stats(store: VectorStore) -> None:
    store.upsert_pages([make_page("doc", n) for n in (1, 2)])
    stats = store.stats()
    assert stats["collection_name"] == "colpali_embeddings"
    assert stats["total_vectors"] == 2
    assert stats["vector_dimension"] == DIM
    assert stats["distance_metric"] == "COSINE"


def test_ensure_collections_is_idempotent_and_refuses_another_shape(store: VectorStore) -> None:
    store.upsert_pages([make_page("doc", 1)])
    store.ensure_collections(dim=DIM)
    assert store.count_pages() == 1
    with pytest.raises(IndexModelMismatch, match=f"{DIM * 2}-d"):
        store.ensure_collections(dim=DIM * 2)


@pytest.mark.parametrize(
    "options",
    [
        # Token pooling goes through colpali-engine, whose import alone loads transformers
        # (several seconds): the full suite runs those, the quick tier does not.
        pytest.param({"token_pooling_factor": 4}, marks=pytest.mark.slow),
        {"mean_pooled_prefetch": True},
        pytest.param({"mean_pooled_prefetch": True, "token_pooling_factor": 3}, marks=pytest.mark.slow),
    ],
)
def test_storage_options_still_find_the_right_page(store_factory: StoreFactory, options: dict) -> None:
    store = store_factory(**options)
    pages = [make_page(f"doc-{d}", n) for d in range(5) for n in (1, 2)]
    store.upsert_pages(pages)
    target = pages[6]
    hits = store.search(target.vectors[:8], limit=3)
    assert (hits[0][1]["document_id"], hits[0][1]["page_number"]) == (target.document_id, target.page_number)
    if options.get("mean_pooled_prefetch") and not options.get("token_pooling_factor"):
        # The rerank runs on the full multivector: exact self-match scores survive.
        assert hits[0][0] == pytest.approx(8.0, abs=0.02)


def test_rows_and_columns_are_grid_means_between_the_other_tokens() -> None:
    # 1 prefix token, a 2x3 grid, 1 suffix token.
    vectors = np.arange(8 * 2, dtype=np.float32).reshape(8, 2)
    rows, columns = pool_rows_and_columns(vectors, PatchGrid(start=1, rows=2, cols=3))
    grid = vectors[1:7]
    np.testing.assert_allclose(rows, [vectors[0], grid[0:3].mean(0), grid[3:6].mean(0), vectors[7]])
    np.testing.assert_allclose(
        columns, [vectors[0], grid[[0, 3]].mean(0), grid[[1, 4]].mean(0), grid[[2, 5]].mean(0), vectors[7]]
    )


def test_edge_pages_and_records_survive_reopen(tmp_path: Path) -> None:
    settings = QdrantSettings(path=tmp_path / "qdrant")
    store = open_vector_store(settings)
    assert isinstance(store, EdgeVectorStore)
    store.ensure_collections(dim=DIM)
    page = make_page("doc", 1)
    record = DocumentRecord(document_id="doc", version=1, state="complete", total_pages=1, indexed_pages=[1])
    store.upsert_pages([page])
    store.put_records([record])
    store.close()

    reopened = open_vector_store(settings)
    try:
        assert reopened.get_records(["doc"]) == {"doc": record}
        assert reopened.count_pages("doc") == 1
        assert reopened.stats()["vector_dimension"] == DIM
        assert reopened.search(page.vectors, limit=1)[0][1]["page_number"] == 1
        reopened.ensure_collections(dim=DIM)
    finally:
        reopened.close()


def test_edge_refuses_a_layout_change_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "qdrant"
    first = EdgeVectorStore(QdrantSettings(path=path))
    first.ensure_collections(dim=DIM)
    first.close()
    second = EdgeVectorStore(QdrantSettings(path=path, mean_pooled_prefetch=True))
    try:
        with pytest.raises(RuntimeError, match="pooling_factor"):
            second.ensure_collections(dim=DIM)
    finally:
        second.close()


def test_edge_refuses_a_shard_pooled_by_the_earlier_scheme(tmp_path: Path) -> None:
    path = tmp_path / "qdrant"
    first = EdgeVectorStore(QdrantSettings(path=path, token_pooling_factor=4))
    first.ensure_collections(dim=DIM)
    index = first.stats()["index"]
    first.close()
    sidecar = path / index / "colstream_layout.json"
    # What a sidecar looked like when pooling meant runs of consecutive tokens.
    sidecar.write_text(json.dumps({"dim": DIM, "float16": True, "pooling_factor": 4, "prefetch_vector": False,
                                   "model": IndexModel.unspecified(DIM).as_dict()}))
    second = EdgeVectorStore(QdrantSettings(path=path, token_pooling_factor=4))
    try:
        with pytest.raises(RuntimeError, match="scheme"):
            second.ensure_collections(dim=DIM)
    finally:
        second.close()


def test_open_vector_store_picks_server_when_url_set() -> None:
    with warnings.catch_warnings():
        # Nothing listens there: the client's version probe warns, nothing else is sent.
        warnings.simplefilter("ignore", UserWarning)
        store = open_vector_store(QdrantSettings(url="http://127.0.0.1:1"))
    try:
        assert isinstance(store, QdrantServerVectorStore)
    finally:
        store.close()


def test_delete_documents_purges_many_documents_in_one_call(tmp_path: Path) -> None:
    from colstream.infra.settings import QdrantSettings
    from colstream.infra.vectorstore import open_vector_store

    store = open_vector_store(QdrantSettings(path=tmp_path / "q"))
    store.ensure_collections(dim=128)
    rng = np.random.default_rng(3)

    def point(doc: str, version: int, page: int) -> PagePoint:
        return PagePoint(document_id=doc, version=version, page_number=page, total_pages=3, filename=None,
                         blob_uri=None, model="m", vectors=rng.normal(size=(4, 128)).astype(np.float32))

    store.upsert_pages([point("a", 1, 1), point("a", 1, 2), point("b", 1, 1), point("b", 5, 2), point("c", 1, 1)])
    store.delete_documents([("a", None), ("b", 5)])
    assert store.count_pages("a") == 0
    assert [p["page_number"] for p in store.page_payloads("b")] == [2]
    assert store.count_pages("c") == 1
    store.close()
