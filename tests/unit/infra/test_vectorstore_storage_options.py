"""Storage options: image grids from the models, row/column prefetch, hierarchical pooling."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from qdrant_client import QdrantClient

from colstream.consumers.embedder.stage import EmbedderHandler
from colstream.consumers.sink.core import SinkCore
from colstream.embedding.engine import EmbedItem, EmbedResult, PipelinedEmbedder
from colstream.embedding.model import EmbeddingModel, ImageGrid, load_model
from colstream.embedding.tiny import ensure_tiny_checkpoint
from colstream.infra.settings import ColstreamSettings, ModelSettings, QdrantSettings
from colstream.infra.vectorstore import (
    PagePoint,
    PatchGrid,
    VectorStore,
    fallback_grid,
    hierarchical_pool,
    pool_rows_and_columns,
)
from colstream.infra.vectorstore_edge import EdgeVectorStore
from colstream.infra.vectorstore_qdrant import QdrantServerVectorStore
from colstream.schemas import DocumentRecord, PageTask, PageVectors, decode_vectors, encode
from colstream.schemas.events import DocumentRef

MODEL_CACHE = Path(__file__).resolve().parents[3] / ".colstream" / "models"


# -- the grid the models report ------------------------------------------------------------------


# Loading a model imports transformers and colpali-engine, several seconds by itself: the full
# suite runs the tests that load one, the quick tier does not.
@pytest.fixture(scope="module", params=[pytest.param(f, marks=pytest.mark.slow) for f in ("colqwen2", "colpali")])
def tiny_model(request: pytest.FixtureRequest) -> EmbeddingModel:
    path = ensure_tiny_checkpoint(request.param, MODEL_CACHE)
    return load_model(ModelSettings(family=request.param, name_or_path=str(path), device="cpu", dtype="float32"))


def _pages() -> list[Image.Image]:
    # Portrait, landscape and square pages: a grid must follow the page's shape.
    shapes = [((300, 520), "white"), ((640, 360), "gray"), ((400, 400), "black")]
    return [Image.new("RGB", size, color) for size, color in shapes]


def test_reported_grid_covers_exactly_the_processors_image_tokens(tiny_model: EmbeddingModel) -> None:
    images = _pages()
    inputs = tiny_model.preprocess_images(images)
    grids = tiny_model.image_grids(inputs)
    image_token_id = tiny_model.processor.image_token_id
    for i, grid in enumerate(grids):
        assert grid is not None
        real_ids = inputs.tensors["input_ids"][i][inputs.tensors["attention_mask"][i].bool()]
        is_image = (real_ids == image_token_id).numpy()
        expected = np.zeros_like(is_image)
        expected[grid.start : grid.start + grid.rows * grid.cols] = True
        np.testing.assert_array_equal(is_image, expected)
        if tiny_model.family == "colqwen2":
            t, h, w = inputs.tensors["image_grid_thw"][i].tolist()
            merge = tiny_model.processor.image_processor.merge_size
            assert (grid.rows, grid.cols) == (t * h // merge, w // merge)
        else:
            side = int(np.sqrt(tiny_model.processor.image_seq_length))
            assert (grid.rows, grid.cols) == (side, side)
    if tiny_model.family == "colqwen2":
        portrait, landscape, square = grids
        assert portrait is not None and landscape is not None and square is not None
        assert portrait.rows > portrait.cols and landscape.rows < landscape.cols and square.rows == square.cols


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_engine_results_carry_the_grid_of_their_own_page(tiny_model: EmbeddingModel) -> None:
    images = _pages()
    expected = [tiny_model.image_grids(tiny_model.preprocess_images([image]))[0] for image in images]
    with PipelinedEmbedder(tiny_model, max_batch_size=3) as engine:
        results = engine.embed_sync([EmbedItem(key=i, image_bytes=_png(image)) for i, image in enumerate(images)])
    for result, grid in zip(results, expected, strict=True):
        assert result.vectors is not None and result.grid == grid
        assert grid is not None and grid.start + grid.rows * grid.cols <= result.vectors.shape[0]


class _RecordingStore:
    def __init__(self) -> None:
        self.points: list[PagePoint] = []

    def upsert_pages(self, points: Any) -> None:
        self.points.extend(points)

    def delete_documents(self, purges: Any) -> None:
        pass

    def get_records(self, document_ids: Any) -> dict[str, DocumentRecord]:
        return {}

    def put_records(self, records: Any) -> None:
        pass


def test_grid_travels_from_embed_result_through_the_topic_into_the_stored_point() -> None:
    ref = DocumentRef(document_id="doc", version=3, filename="doc.pdf", blob_uri="file:///doc.pdf")
    task = PageTask(document=ref, page_number=1, total_pages=2, width=10, height=10, image_b64="AA==")
    vectors = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float16)
    handler = EmbedderHandler(ColstreamSettings(), engine=None, model_name="m", blob_store=None)  # type: ignore[arg-type]
    grids: list[PatchGrid | None] = []
    for grid in (ImageGrid(start=2, rows=3, cols=4), None):
        [out] = handler._vectors_or_failure(None, task, EmbedResult(key=0, vectors=vectors, grid=grid))  # type: ignore[arg-type]
        message = decode_vectors(out.value)
        assert isinstance(message, PageVectors)
        store = _RecordingStore()
        SinkCore(store).apply([message])
        grids.append(store.points[0].grid)
    assert grids == [PatchGrid(start=2, rows=3, cols=4), None]


def test_page_vectors_refuse_a_partial_or_oversized_grid() -> None:
    ref = DocumentRef(document_id="doc", version=1)
    array = np.ones((10, 4), np.float16)
    kwargs: dict[str, Any] = {"document": ref, "page_number": 1, "total_pages": 1, "model": "m", "array": array}
    with pytest.raises(ValueError, match="does not fit"):
        PageVectors.from_array(**kwargs, image_grid=(2, 3, 3))
    message = PageVectors.from_array(**kwargs, image_grid=(1, 3, 3))
    with pytest.raises(ValueError, match="together"):
        PageVectors.model_validate({**message.model_dump(), "grid_cols": None})
    # Messages without a grid stay byte-identical to what producers sent before.
    assert b"grid_rows" not in encode(PageVectors.from_array(**kwargs))


# -- row and column vectors ---------------------------------------------------------------------


def test_row_and_column_vectors_have_one_mean_per_row_and_column() -> None:
    rng = np.random.default_rng(1)
    prefix, rows, cols, suffix, dim = 4, 7, 5, 9, 16
    vectors = rng.standard_normal((prefix + rows * cols + suffix, dim)).astype(np.float16)
    row_vectors, column_vectors = pool_rows_and_columns(vectors, PatchGrid(start=prefix, rows=rows, cols=cols))
    assert row_vectors.shape == (prefix + rows + suffix, dim)
    assert column_vectors.shape == (prefix + cols + suffix, dim)
    patches = vectors[prefix : prefix + rows * cols].astype(np.float32)
    for r in range(rows):
        np.testing.assert_allclose(row_vectors[prefix + r], patches[r * cols : (r + 1) * cols].mean(0), atol=1e-6)
    for c in range(cols):
        np.testing.assert_allclose(column_vectors[prefix + c], patches[c::cols].mean(0), atol=1e-6)
    np.testing.assert_array_equal(row_vectors[:prefix], vectors[:prefix].astype(np.float32))
    np.testing.assert_array_equal(column_vectors[-suffix:], vectors[-suffix:].astype(np.float32))


@pytest.mark.parametrize("tokens", [1, 2, 5, 16, 17, 749])
def test_fallback_grid_is_near_square_and_fits(tokens: int) -> None:
    grid = fallback_grid(tokens)
    assert grid.start == 0 and grid.stop <= tokens
    assert tokens - grid.stop < grid.cols  # only a partial last row is left over
    assert abs(grid.rows - grid.cols) <= 1 + (tokens - grid.stop > 0)


def _page(rng: np.random.Generator, index: int, grid: PatchGrid, dim: int, extra: int) -> PagePoint:
    vectors = rng.standard_normal((grid.stop + extra, dim)).astype(np.float16)
    return PagePoint(f"doc-{index}", 1, 1, 1, None, None, "m", vectors, grid=grid)


def _maxsim(query: np.ndarray, page: np.ndarray) -> float:
    # Cosine MaxSim, as the collection computes it.
    unit_q = query / np.linalg.norm(query, axis=1, keepdims=True)
    p = page.astype(np.float32)
    unit_p = p / np.linalg.norm(p, axis=1, keepdims=True)
    return float((unit_q @ unit_p.T).max(axis=1).sum())


@pytest.fixture(params=["edge", "client-local"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    opened: list[VectorStore] = []

    def factory(dim: int, **options: Any) -> VectorStore:
        settings = QdrantSettings(path=tmp_path / f"qdrant-{len(opened)}", **options)
        store: VectorStore
        if request.param == "edge":
            store = EdgeVectorStore(settings)
        else:
            store = QdrantServerVectorStore(settings, client=QdrantClient(location=":memory:"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            store.ensure_collections(dim=dim)
        opened.append(store)
        return store

    factory.backend = request.param  # type: ignore[attr-defined]
    yield factory
    for store in opened:
        store.close()


def test_prefetch_on_rows_and_columns_then_rerank_finds_the_full_maxsim_top_page(
    open_store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = f"colstream.infra.vectorstore_{'edge' if open_store.backend == 'edge' else 'qdrant'}"
    # Few candidates per stage, so the first stage really has to pick the page.
    monkeypatch.setattr(f"{module}.PREFETCH_MIN_CANDIDATES", 3)
    monkeypatch.setattr(f"{module}.PREFETCH_CANDIDATES_PER_RESULT", 3)
    dim = 64
    rng = np.random.default_rng(2)
    pages = [_page(rng, i, PatchGrid(start=3, rows=6 + i % 3, cols=5), dim, extra=6) for i in range(40)]
    store = open_store(dim, mean_pooled_prefetch=True)
    store.upsert_pages(pages)
    for target in (0, 17, 39):
        grid = pages[target].grid
        assert grid is not None
        # A query that matches a block of the target page's patches, with noise.
        patch_tokens = pages[target].vectors[grid.start : grid.stop].astype(np.float32)
        query = patch_tokens[:8] + 0.3 * rng.standard_normal((8, dim)).astype(np.float32)
        exact = [_maxsim(query, page.vectors) for page in pages]
        hits = store.search(query, limit=1)
        assert hits[0][1]["document_id"] == f"doc-{int(np.argmax(exact))}" == f"doc-{target}"
        # The rerank is exact MaxSim on the full multivector.
        assert hits[0][0] == pytest.approx(max(exact), abs=0.02)


def test_the_rerank_only_sees_what_the_row_and_column_stage_found(
    open_store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = f"colstream.infra.vectorstore_{'edge' if open_store.backend == 'edge' else 'qdrant'}"
    monkeypatch.setattr(f"{module}.PREFETCH_MIN_CANDIDATES", 3)
    monkeypatch.setattr(f"{module}.PREFETCH_CANDIDATES_PER_RESULT", 3)
    dim, k = 64, 4
    rng = np.random.default_rng(7)
    query = rng.standard_normal((k, dim)).astype(np.float32)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    # A trap page: query token r sits on the diagonal of a k x k grid, every other cell
    # points away from its row's and column's query tokens. Full MaxSim scores it a
    # perfect k; its row and column means point away from the query, so the first
    # stage never proposes it.
    cells = np.stack([query[r] if r == c else -(query[r] + query[c]) for r in range(k) for c in range(k)])
    trap = PagePoint("trap", 1, 1, 1, None, None, "m", cells.astype(np.float16), grid=PatchGrid(0, k, k))
    others = [_page(rng, i, PatchGrid(start=2, rows=4, cols=4), dim, extra=2) for i in range(20)]
    full_scan = open_store(dim)
    prefetched = open_store(dim, mean_pooled_prefetch=True)
    for store in (full_scan, prefetched):
        store.upsert_pages([trap, *others])
    assert full_scan.search(query, limit=1)[0][1]["document_id"] == "trap"
    hits = prefetched.search(query, limit=1)
    assert hits[0][1]["document_id"] != "trap"
    assert hits[0][0] < k - 1


def test_pages_without_a_grid_are_still_found_through_the_prefetch(open_store: Any) -> None:
    dim = 32
    rng = np.random.default_rng(3)
    pages = [
        PagePoint(f"doc-{i}", 1, 1, 1, None, None, "m", rng.standard_normal((30, dim)).astype(np.float16))
        for i in range(8)
    ]
    store = open_store(dim, mean_pooled_prefetch=True)
    store.upsert_pages(pages)
    hits = store.search(pages[5].vectors[:6], limit=1)
    assert hits[0][1]["document_id"] == "doc-5" and hits[0][0] == pytest.approx(6.0, abs=0.02)


# -- hierarchical token pooling ------------------------------------------------------------------


@pytest.mark.slow  # pools tokens with colpali-engine, whose import alone loads transformers
def test_hierarchical_pooling_merges_similar_tokens_by_the_factor() -> None:
    rng = np.random.default_rng(4)
    centers = rng.standard_normal((40, 32)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    # Three near-copies of each center, shuffled: the pooler must find them by similarity.
    tokens = np.repeat(centers, 3, axis=0) + 0.01 * rng.standard_normal((120, 32)).astype(np.float32)
    tokens = tokens[rng.permutation(120)].astype(np.float16)
    pooled = hierarchical_pool(tokens, 3)
    assert pooled.shape == (40, 32)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, atol=1e-3)
    # Every pooled vector is one of the centers (cosine ~1), and every center is covered.
    similarity = pooled @ centers.T
    assert similarity.max(axis=1).min() > 0.999
    assert sorted(similarity.argmax(axis=1).tolist()) == list(range(40))
    assert hierarchical_pool(tokens, 1) is tokens


@pytest.mark.slow  # pools tokens with colpali-engine, whose import alone loads transformers
def test_token_pooling_setting_stores_a_third_of_the_tokens(tmp_path: Path) -> None:
    dim = 16
    rng = np.random.default_rng(5)
    page = _page(rng, 0, PatchGrid(start=2, rows=9, cols=10), dim, extra=8)  # 100 tokens
    for options, expected in [
        ({}, {"": 100}),
        ({"token_pooling_factor": 3}, {"": 33}),
        # Rows and columns come from the full tokens (2 prefix + 9 or 10 + 8 suffix).
        ({"token_pooling_factor": 3, "mean_pooled_prefetch": True},
         {"original": 33, "mean_pooling_rows": 19, "mean_pooling_columns": 20}),
    ]:
        store = EdgeVectorStore(QdrantSettings(path=tmp_path / str(len(options)), **options))
        try:
            store.ensure_collections(dim=dim)
            store.upsert_pages([page])
            [record] = store._pages.retrieve([page.point_id], with_payload=False, with_vector=True)  # type: ignore[union-attr]
            vector = record.vector if isinstance(record.vector, dict) else {"": record.vector}
            assert {name: len(tokens) for name, tokens in vector.items()} == expected
            assert store.search(page.vectors[:5], limit=1)[0][1]["document_id"] == "doc-0"
        finally:
            store.close()


@pytest.mark.slow  # pools tokens with colpali-engine, whose import alone loads transformers
def test_hierarchical_pool_matches_colpali_engine() -> None:
    from colpali_engine.compression.token_pooling import HierarchicalTokenPooler

    vectors = np.random.default_rng(6).standard_normal((50, 8)).astype(np.float32)
    reference = HierarchicalTokenPooler().pool_embeddings([torch.from_numpy(vectors)], pool_factor=4)[0]
    np.testing.assert_allclose(hierarchical_pool(vectors, 4), reference.numpy(), atol=1e-6)
