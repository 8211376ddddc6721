"""Qdrant's write limits in the sink: the per-multivector limit (fewer than 1,048,576
numbers), the request body limit, pooling an over-limit page down to fit, dead-lettering
it as VectorsTooLarge when pooling is off, and splitting batches by bytes. Pure logic on
fakes first, then against a real Qdrant server."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from colstream.consumers.sink.core import SinkCore
from colstream.consumers.sink.limits import (
    GRPC_BYTES_PER_NUMBER,
    QDRANT_MAX_MULTIVECTOR_NUMBERS,
    VectorsTooLarge,
    WriteLimits,
    fit_page,
    point_size,
    split_by_bytes,
)
from colstream.consumers.sink.stage import SinkHandler, write_limits
from colstream.infra.kafka import RecordPosition
from colstream.infra.settings import ColstreamSettings
from colstream.infra.stage_runner import RawRecord
from colstream.infra.vectorstore import PagePoint, PatchGrid
from colstream.schemas import DocumentRef, PageVectors, encode
from colstream.testing import MemoryVectorStore

REPO = Path(__file__).resolve().parents[4]


def chunk_mean_pool(vectors: np.ndarray, factor: int) -> np.ndarray:
    """A stand-in pooler with the hierarchical pooler's contract: at most tokens // factor rows."""
    keep = max(1, vectors.shape[0] // factor)
    return np.stack([part.mean(axis=0) for part in np.array_split(vectors.astype(np.float32), keep)])


def vectors(tokens: int, dim: int, seed: int = 0) -> np.ndarray:
    array = np.random.default_rng(seed).normal(size=(tokens, dim)).astype(np.float32)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


# -- the limits -------------------------------------------------------------------------


def test_multivector_limit_is_fewer_than_2_to_the_20_numbers() -> None:
    limits = WriteLimits(max_request_bytes=None)
    # 2,560 dimensions: 409 tokens fit (1,047,040 numbers), 410 do not (1,049,600).
    assert limits.problems(409, 2560, None, None) == []
    problem = limits.problems(410, 2560, None, None)
    assert problem and "410 x 2560 = 1,049,600 numbers" in problem[0] and "1,048,576" in problem[0]
    # Exactly 2^20 numbers is already refused by Qdrant.
    assert limits.problems(QDRANT_MAX_MULTIVECTOR_NUMBERS // 128, 128, None, None)
    assert limits.max_tokens(2560, None) == 409
    assert limits.max_tokens(128, None) == 8191


def test_layout_pooling_and_prefetch_change_what_must_fit() -> None:
    pooled_layout = WriteLimits(max_request_bytes=None, layout_pooling_factor=3)
    # The store keeps tokens // 3 rows: 1,200 tokens of 2,560-d store 400 rows, which fit.
    assert pooled_layout.stored_rows(1200, None) == [400]
    assert pooled_layout.problems(1200, 2560, None, None) == []
    prefetch = WriteLimits(max_request_bytes=None, prefetch=True)
    # Rows and columns of a 20 x 30 grid after 4 prompt tokens, 2 after it.
    assert prefetch.stored_rows(606, PatchGrid(start=4, rows=20, cols=30)) == [606, 26, 36]


def test_request_bytes_follow_the_transport() -> None:
    rest = WriteLimits.for_transport("rest", 32 * 1024 * 1024)
    grpc = WriteLimits.for_transport("grpc")
    assert rest.request_budget is not None and rest.request_budget < 32 * 1024 * 1024
    assert grpc.request_budget is None and grpc.bytes_per_number == GRPC_BYTES_PER_NUMBER
    # A 750 x 128 ColQwen2 page is ~2.3 MB of JSON: about 13 per 32 MiB request.
    size = rest.point_bytes(750, 128, None, {"document_id": "d"})
    assert 2_200_000 < size < 2_400_000
    assert rest.request_budget // size == 13
    assert rest.problems(15_000, 128, None, None)[0].startswith("multivector")
    small = WriteLimits(max_request_bytes=1024 * 1024)
    problem = small.problems(400, 128, None, None)
    assert len(problem) == 1 and "request bytes" in problem[0] and "server limit 1,048,576" in problem[0]


def test_deployment_limits_come_from_settings(tmp_path: Path) -> None:
    settings = ColstreamSettings().updated(state_dir=tmp_path)
    embedded = write_limits(settings)
    assert embedded.request_budget is None and embedded.pooler == "hierarchical"
    server = write_limits(
        settings.updated(qdrant={"url": "http://q:6333", "max_request_mb": 8, "oversize_pooler": "off",
                                 "token_pooling_factor": 2, "mean_pooled_prefetch": True})
    )
    assert server.max_request_bytes == 8 * 1024 * 1024 and server.pooler == "off"
    assert server.layout_pooling_factor == 2 and server.prefetch


# -- fitting a page ---------------------------------------------------------------------


def test_a_page_that_fits_is_left_alone() -> None:
    page = vectors(300, 2560)
    fitted = fit_page(page, PatchGrid(0, 10, 30), WriteLimits(max_request_bytes=None), pool=chunk_mean_pool)
    assert fitted.vectors is page and fitted.pooled_from is None and fitted.grid == PatchGrid(0, 10, 30)


def test_an_over_limit_page_is_pooled_down_just_enough() -> None:
    page = vectors(1000, 2560)
    fitted = fit_page(page, None, WriteLimits(max_request_bytes=None), pool=chunk_mean_pool)
    rows = fitted.vectors.shape[0]
    assert fitted.pooled_from == 1000 and fitted.factor == 3  # 1000 // 2 = 500 rows would not fit
    assert rows == 333 and rows * 2560 < QDRANT_MAX_MULTIVECTOR_NUMBERS
    assert fitted.grid is None  # pooled tokens are no longer the patch grid


@pytest.mark.slow  # pools tokens with colpali-engine, whose import alone loads transformers
def test_the_default_pooler_is_colpali_engines_hierarchical_pooler() -> None:
    page = vectors(450, 2560)
    fitted = fit_page(page, None, WriteLimits(max_request_bytes=None))
    assert fitted.factor == 2 and 0 < fitted.vectors.shape[0] <= 225
    np.testing.assert_allclose(np.linalg.norm(fitted.vectors, axis=1), 1.0, atol=1e-3)


def test_with_pooling_off_an_over_limit_page_is_too_large_with_its_numbers() -> None:
    with pytest.raises(VectorsTooLarge) as caught:
        fit_page(vectors(410, 2560), None, WriteLimits(max_request_bytes=None, pooler="off"), where="doc 'd' page 3")
    assert caught.value.error_type == "VectorsTooLarge"
    assert "doc 'd' page 3" in caught.value.message and "410 x 2560 = 1,049,600" in caught.value.message
    assert "pooling is off" in caught.value.message


# -- splitting batches ------------------------------------------------------------------


def test_split_by_bytes_keeps_order_and_every_item_under_the_budget() -> None:
    sizes = [4, 4, 4, 9, 1, 1, 12, 3]
    groups = list(split_by_bytes(sizes, lambda s: s, 10))
    assert [s for g in groups for s in g] == sizes
    assert groups == [[4, 4], [4], [9, 1], [1], [12], [3]]
    assert list(split_by_bytes(sizes, lambda s: s, None)) == [sizes]
    assert list(split_by_bytes([], lambda s: s, 10)) == []


class RecordingStore(MemoryVectorStore):
    def __init__(self, dim: int, limits: WriteLimits) -> None:
        super().__init__(dim=dim)
        self.limits = limits
        self.requests: list[int] = []

    def upsert_pages(self, points: Sequence[PagePoint]) -> None:
        size = sum(point_size(self.limits)(p) for p in points)
        budget = self.limits.request_budget
        if budget is not None and size > budget:
            raise RuntimeError(f"413: {size} bytes")  # what the server would answer
        self.requests.append(len(points))
        super().upsert_pages(points)


def ref(doc: str, version: int = 1) -> DocumentRef:
    return DocumentRef(document_id=doc, version=version, filename=f"{doc}.pdf")


def page_message(doc: str, number: int, total: int, tokens: int, dim: int) -> PageVectors:
    return PageVectors.from_array(document=ref(doc), page_number=number, total_pages=total, model="m",
                                  array=vectors(tokens, dim, seed=number))


def test_the_core_splits_an_oversize_batch_into_requests_under_the_budget() -> None:
    limits = WriteLimits(max_request_bytes=1024 * 1024)
    store = RecordingStore(128, limits)
    core = SinkCore(store, limits)
    # 10 pages of 100 x 128: ~310 KB each, ~3 MB in all against a ~1 MB budget.
    outcome = core.apply([page_message("d", n, 10, 100, 128) for n in range(1, 11)])
    assert outcome.written_pages == 10 and store.pages_of("d") == {n: 1 for n in range(1, 11)}
    assert len(store.requests) == core.upsert_calls >= 4 and sum(store.requests) == 10
    assert [c.state for c in outcome.completed] == ["complete"]


# -- the sink adapter -------------------------------------------------------------------


def raw_records(*messages: PageVectors) -> list[RawRecord]:
    return [RawRecord(key=m.document.document_id, value=encode(m), position=RecordPosition("documents.vectors", 0, i))
            for i, m in enumerate(messages)]


@pytest.fixture
def sink_settings(tmp_path: Path) -> ColstreamSettings:
    return ColstreamSettings().updated(kafka={"bootstrap_servers": "in-memory"}, state_dir=tmp_path,
                                       blob={"local_root": tmp_path / "blobs"})


@pytest.mark.slow  # pools tokens with colpali-engine, whose import alone loads transformers
def test_sink_pools_an_over_limit_page_and_writes_the_rest_untouched(sink_settings: ColstreamSettings) -> None:
    store = MemoryVectorStore(dim=2560)
    handler = SinkHandler(sink_settings, store)
    try:
        outputs = handler.write(raw_records(page_message("w", 1, 2, 600, 2560), page_message("w", 2, 2, 50, 2560)))
    finally:
        handler.close()
    assert [r.topic for r in outputs] == [sink_settings.topics.indexed]
    assert json.loads(outputs[0].value or b"null")["state"] == "complete"
    stored = {p.page_number: p.vectors.shape[0] for p in store.points.values()}
    assert stored[2] == 50 and 0 < stored[1] <= 300 and stored[1] * 2560 < QDRANT_MAX_MULTIVECTOR_NUMBERS


def test_sink_dead_letters_an_over_limit_page_when_pooling_is_off(sink_settings: ColstreamSettings) -> None:
    store = MemoryVectorStore(dim=2560)
    handler = SinkHandler(sink_settings.updated(qdrant={"oversize_pooler": "off"}), store)
    try:
        outputs = handler.write(raw_records(page_message("w", 1, 2, 410, 2560), page_message("w", 2, 2, 50, 2560)))
    finally:
        handler.close()
    letters = [json.loads(r.value or b"null") for r in outputs if r.topic == sink_settings.topics.dlq]
    assert len(letters) == 1 and letters[0]["error_type"] == "VectorsTooLarge"
    assert "410 x 2560 = 1,049,600 numbers" in letters[0]["message"]
    assert {p.page_number for p in store.points.values()} == {2}
    done = [json.loads(r.value or b"null") for r in outputs if r.topic == sink_settings.topics.indexed]
    assert done and done[0]["state"] == "partial" and done[0]["failed_pages"] == [1]


# -- against a real Qdrant server -------------------------------------------------------


@pytest.fixture(scope="module")
def small_request_qdrant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Qdrant server whose request body limit is 1 MiB, so an oversize batch stays cheap."""
    from colstream.testing.qdrant_server import find_qdrant_binary, qdrant_server

    binary = find_qdrant_binary(REPO)
    if binary is None:
        pytest.skip("no Qdrant server binary (COLSTREAM_QDRANT_BINARY or ../shared/tools/qdrant-*)")
    server = qdrant_server(binary, tmp_path_factory.mktemp("qdrant-1mib"))
    # The server reads its settings from the environment once, at start: set the limit
    # only while it starts, so servers started later (the session's) keep the default.
    previous = os.environ.get("QDRANT__SERVICE__MAX_REQUEST_SIZE_MB")
    os.environ["QDRANT__SERVICE__MAX_REQUEST_SIZE_MB"] = "1"
    try:
        url = server.__enter__()
    finally:
        if previous is None:
            os.environ.pop("QDRANT__SERVICE__MAX_REQUEST_SIZE_MB", None)
        else:
            os.environ["QDRANT__SERVICE__MAX_REQUEST_SIZE_MB"] = previous
    try:
        yield url
    finally:
        server.__exit__(None, None, None)


def _server_store(settings: ColstreamSettings, dim: int) -> Any:
    from colstream.infra.vectorstore_qdrant import QdrantServerVectorStore

    store = QdrantServerVectorStore(settings.qdrant)
    store.ensure_collections(dim=dim)
    return store


@pytest.mark.slow  # starts its own Qdrant server
def test_real_server_refuses_the_whole_batch_and_the_sink_splits_it(
    small_request_qdrant: str, sink_settings: ColstreamSettings
) -> None:
    from qdrant_client import QdrantClient
    from qdrant_client import models as qm

    settings = sink_settings.updated(qdrant={"url": small_request_qdrant, "max_request_mb": 1,
                                             "collection": "limits_split", "on_disk_float16": False})
    messages = [page_message("big", n, 8, 100, 128) for n in range(1, 9)]  # ~2.4 MB of JSON in all
    client = QdrantClient(url=small_request_qdrant, timeout=60)
    client.create_collection("raw_probe", vectors_config=qm.VectorParams(
        size=128, distance=qm.Distance.COSINE,
        multivector_config=qm.MultiVectorConfig(comparator=qm.MultiVectorComparator.MAX_SIM)))
    # The limit is real: the batch in one request is refused by the server.
    with pytest.raises(Exception, match=r"(?i)payload|too large|413|overflow|limit"):
        client.upsert("raw_probe", points=[
            qm.PointStruct(id=n, vector=m.to_array().astype(np.float32).tolist()) for n, m in enumerate(messages)
        ], wait=True)
    store = _server_store(settings, 128)
    handler = SinkHandler(settings, store)
    try:
        outputs = handler.write(raw_records(*messages))
        assert handler.core.upsert_calls >= 3
        assert store.count_pages("big") == 8
        indexed = [json.loads(r.value or b"null") for r in outputs if r.topic == settings.topics.indexed]
        assert [event["state"] for event in indexed] == ["complete"]
        hits = store.search(messages[4].to_array()[:3].astype(np.float32), limit=1)
        assert hits and hits[0][1]["page_number"] == 5
    finally:
        handler.close()


def test_real_server_takes_a_pooled_page_and_never_sees_a_refused_one(
    qdrant_url: str, sink_settings: ColstreamSettings
) -> None:
    from qdrant_client import QdrantClient
    from qdrant_client import models as qm

    dim, tokens = 2560, 420  # 1,075,200 numbers: over Qdrant's per-multivector limit
    over = page_message("wide", 1, 2, tokens, dim)
    fine = page_message("wide", 2, 2, 40, dim)
    client = QdrantClient(url=qdrant_url, timeout=120)
    client.create_collection("wide_probe", vectors_config=qm.VectorParams(
        size=dim, distance=qm.Distance.COSINE,
        multivector_config=qm.MultiVectorConfig(comparator=qm.MultiVectorComparator.MAX_SIM)))
    with pytest.raises(Exception, match=r"(?i)multivector|1048576|limit|too"):
        client.upsert("wide_probe", points=[qm.PointStruct(id=1, vector=over.to_array().astype(np.float32).tolist())],
                      wait=True)

    pooled = sink_settings.updated(qdrant={"url": qdrant_url, "collection": "limits_pooled"})
    store = _server_store(pooled, dim)
    handler = SinkHandler(pooled, store)
    try:
        outputs = handler.write(raw_records(over, fine))
        assert store.count_pages("wide") == 2
        assert not [r for r in outputs if r.topic == pooled.topics.dlq]
    finally:
        handler.close()

    refused = sink_settings.updated(qdrant={"url": qdrant_url, "collection": "limits_off", "oversize_pooler": "off"})
    store = _server_store(refused, dim)
    handler = SinkHandler(refused, store)
    try:
        outputs = handler.write(raw_records(over, fine))
        letters = [json.loads(r.value or b"null") for r in outputs if r.topic == refused.topics.dlq]
        assert [letter["error_type"] for letter in letters] == ["VectorsTooLarge"]
        assert "420 x 2560 = 1,075,200 numbers" in letters[0]["message"]
        assert [p["page_number"] for p in store.page_payloads("wide")] == [2]
    finally:
        handler.close()
