"""Storage options: bytes per page on disk and query latency of each layout, on Qdrant Edge.

    .venv/bin/python bench/storage_options.py [--pages 300] [--queries 30]

Every option is built through ``EdgeVectorStore`` from ``QdrantSettings`` exactly as the
sink would (same code path, same shard configuration), from the same pages:

* float32: every token, 4-byte floats; the baseline every ratio is taken against, with
  a full-scan MaxSim query;
* float16 (the default): every token, 2-byte floats;
* float16 + hierarchical token pooling (``token_pooling_factor=3``): colpali-engine's
  ``HierarchicalTokenPooler``, ~1/3 of the tokens;
* float16 + row/column prefetch (``mean_pooled_prefetch``): full ``original`` plus one
  mean vector per patch-grid row and column; queried both ways, full scan over
  ``original`` and prefetch on rows + columns then rerank on ``original``;
* both poolings together.

Pages are synthetic ColQwen2-shaped multivectors: 4 prefix tokens, a 32 x 23 (portrait)
or 23 x 32 (landscape) patch grid, 9 suffix tokens = 749 tokens x 128, the count an A4
page has at the 768 visual-token cap. Each token is a page vector plus its row's and
its column's vectors plus noise, normalised, so rows and columns carry a signal as
they do on real pages. Queries are 20 noisy copies of one page's patch tokens. Sizes
and latencies do not depend on the values; "top-1 = float32" (how often an option's best
page is the float32 full scan's best page) is a sanity check on this synthetic data, not
a retrieval-quality figure for real documents.

Bytes on disk: blocks allocated under the pages shard's ``segments`` directory (where the
vectors live) after the upserts and a flush, minus those of the empty shard; the WAL is
reported beside it (Edge preallocates it, so it grows in steps, not per page).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common  # the benchmarks' shared helpers (bench/_common.py)
import numpy as np

from colstream.infra.settings import QdrantSettings
from colstream.infra.vectorstore import PagePoint, PatchGrid, hierarchical_pool
from colstream.infra.vectorstore_edge import EdgeVectorStore

DIM = 128
PREFIX_TOKENS = 4
SUFFIX_TOKENS = 9
GRID_LONG, GRID_SHORT = 32, 23
QUERY_TOKENS = 20
WARMUP_QUERIES = 3
UPSERT_BATCH = 64

OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("float32", {"on_disk_float16": False}),
    ("float16", {"on_disk_float16": True}),
    ("float16 + hierarchical pooling x3", {"on_disk_float16": True, "token_pooling_factor": 3}),
    ("float16 + row/col prefetch", {"on_disk_float16": True, "mean_pooled_prefetch": True}),
    (
        "float16 + pooling x3 + row/col prefetch",
        {"on_disk_float16": True, "token_pooling_factor": 3, "mean_pooled_prefetch": True},
    ),
]


@dataclass
class Measured:
    label: str
    mode: str  # "full scan" or "prefetch + rerank"
    segment_bytes_per_page: float
    wal_bytes_per_page: float
    write_ms_per_page: float
    latency_ms: list[float]
    top1_agreement: float | None = None

    @property
    def p50(self) -> float:
        return statistics.median(self.latency_ms)

    @property
    def p95(self) -> float:
        ordered = sorted(self.latency_ms)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def _unit(array: np.ndarray) -> np.ndarray:
    return array / np.linalg.norm(array, axis=-1, keepdims=True)


def make_pages(count: int, seed: int = 0) -> list[PagePoint]:
    rng = np.random.default_rng(seed)
    pages = []
    for index in range(count):
        rows, cols = (GRID_LONG, GRID_SHORT) if index % 4 else (GRID_SHORT, GRID_LONG)
        base = rng.standard_normal(DIM)
        row_part = rng.standard_normal((rows, 1, DIM))
        col_part = rng.standard_normal((1, cols, DIM))
        noise = 1.5 * rng.standard_normal((rows, cols, DIM))
        grid_tokens = (base + row_part + col_part + noise).reshape(rows * cols, DIM)
        other = rng.standard_normal((PREFIX_TOKENS + SUFFIX_TOKENS, DIM))
        tokens = np.concatenate([other[:PREFIX_TOKENS], grid_tokens, other[PREFIX_TOKENS:]])
        pages.append(
            PagePoint(
                document_id=f"doc-{index // 10}",
                version=1,
                page_number=index % 10 + 1,
                total_pages=10,
                filename=None,
                blob_uri=None,
                model="synthetic-colqwen2-shape",
                vectors=_unit(tokens).astype(np.float16),  # as the embedder publishes them
                grid=PatchGrid(start=PREFIX_TOKENS, rows=rows, cols=cols),
            )
        )
    return pages


def make_queries(pages: list[PagePoint], count: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    queries = []
    for _ in range(count):
        page = pages[int(rng.integers(len(pages)))]
        assert page.grid is not None
        picked = rng.choice(np.arange(page.grid.start, page.grid.stop), QUERY_TOKENS, replace=False)
        tokens = page.vectors[picked].astype(np.float32) + 0.08 * rng.standard_normal((QUERY_TOKENS, DIM))
        queries.append(_unit(tokens).astype(np.float32))
    return queries


def allocated_bytes(path: Path) -> int:
    # Blocks, not sizes: Edge preallocates and mmaps files.
    return sum(item.stat().st_blocks * 512 for item in path.rglob("*") if item.is_file())


@dataclass
class Built:
    label: str
    options: dict[str, Any]
    store: EdgeVectorStore
    segment_bytes_per_page: float
    wal_bytes_per_page: float
    write_ms_per_page: float

    @property
    def modes(self) -> list[tuple[str, bool]]:
        prefetch = [("prefetch + rerank", True)] if self.options.get("mean_pooled_prefetch") else []
        return [("full scan", False), *prefetch]


def build(label: str, options: dict[str, Any], pages: list[PagePoint], root: Path) -> Built:
    """Write every page through the store as the sink would; the store stays open for queries."""
    path = root / label.replace(" ", "_").replace("/", "").replace("+", "")
    settings = QdrantSettings(path=path, **options)
    store = EdgeVectorStore(settings)
    store.ensure_collections(dim=DIM)
    shard = path / settings.collection
    empty_segments, empty_wal = allocated_bytes(shard / "segments"), allocated_bytes(shard / "wal")
    started = time.perf_counter()
    for start in range(0, len(pages), UPSERT_BATCH):
        store.upsert_pages(pages[start : start + UPSERT_BATCH])
    write_ms = (time.perf_counter() - started) * 1000 / len(pages)
    segments = (allocated_bytes(shard / "segments") - empty_segments) / len(pages)
    wal = (allocated_bytes(shard / "wal") - empty_wal) / len(pages)
    return Built(label, options, store, segments, wal, write_ms)


def query_interleaved(built: list[Built], queries: list[np.ndarray]) -> tuple[list[Measured], list[list[str]]]:
    """Every query runs against every (option, mode) in turn, so load on a shared machine
    hits all of them alike; returns the measurements and each one's top hits."""
    slots = [(b, mode, prefetch) for b in built for mode, prefetch in b.modes]
    for query in queries[:WARMUP_QUERIES]:  # page cache and code paths warm
        for b, _, prefetch in slots:
            b.store.search(query, limit=10, prefetch=prefetch)
    latencies: list[list[float]] = [[] for _ in slots]
    tops: list[list[str]] = [[] for _ in slots]
    for query in queries[WARMUP_QUERIES:]:
        for i, (b, _, prefetch) in enumerate(slots):
            t0 = time.perf_counter()
            hits = b.store.search(query, limit=10, prefetch=prefetch)
            latencies[i].append((time.perf_counter() - t0) * 1000)
            assert len(hits) == 10
            tops[i].append(f"{hits[0][1]['document_id']}#{hits[0][1]['page_number']}")
    measured = [
        Measured(b.label, mode, b.segment_bytes_per_page, b.wal_bytes_per_page, b.write_ms_per_page, latencies[i])
        for i, (b, mode, _) in enumerate(slots)
    ]
    for row, row_tops in zip(measured, tops, strict=True):
        row.top1_agreement = sum(a == b for a, b in zip(row_tops, tops[0], strict=True)) / len(tops[0])
    return measured, tops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=300)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument(
        "--scale-pages", type=int, default=3000,
        help="also compare full scan and prefetch on one larger collection (0 = skip)",
    )
    args = parser.parse_args()

    pages = make_pages(args.pages)
    queries = make_queries(pages, args.queries + WARMUP_QUERIES)
    tokens = statistics.mean(p.vectors.shape[0] for p in pages)
    print(f"# storage options: {args.pages} pages x {tokens:.0f} tokens x {DIM}, {args.queries} queries "
          f"of {QUERY_TOKENS} tokens, top 10, Qdrant Edge")
    print(f"# machine: {_common.machine()}")
    # Import and first-call costs (torch, scipy, Edge) stay out of the write timings.
    hierarchical_pool(pages[0].vectors, 3)
    with tempfile.TemporaryDirectory(prefix="colstream-storage-") as tmp:
        build("warm-up", {}, pages[:10], Path(tmp)).store.close()
        built = []
        try:
            for label, options in OPTIONS:
                print(f"... writing {label}", flush=True)
                built.append(build(label, options, pages, Path(tmp)))
            print("... querying, interleaved", flush=True)
            rows, _ = query_interleaved(built, queries)
        finally:
            for b in built:
                b.store.close()

    base = rows[0]
    header = (
        "| option | query | vector bytes/page (segments) | x float32 | WAL bytes/page | write ms/page "
        "| query p50 ms | p95 ms | speed-up vs float32 full scan | top-1 = float32 |"
    )
    print()
    print(header)
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row.label} | {row.mode} | {row.segment_bytes_per_page / 1024:,.0f} KiB "
            f"| {row.segment_bytes_per_page / base.segment_bytes_per_page:.2f} "
            f"| {row.wal_bytes_per_page / 1024:,.0f} KiB | {row.write_ms_per_page:.1f} "
            f"| {row.p50:.1f} | {row.p95:.1f} | {base.p50 / row.p50:.1f}x "
            f"| {row.top1_agreement:.0%} |"
        )
    raw32 = tokens * DIM * 4
    print(f"\nraw vectors alone: {raw32 / 1024:,.0f} KiB/page as float32, {raw32 / 2048:,.0f} KiB/page as float16")

    if args.scale_pages:
        # The first stage keeps a fixed number of candidates, so what it saves grows with
        # the collection: the same comparison on a larger one.
        big = make_pages(args.scale_pages, seed=2)
        big_queries = make_queries(big, args.queries + WARMUP_QUERIES, seed=3)
        label, options = OPTIONS[3]
        print(f"\n... {label}, {args.scale_pages} pages", flush=True)
        with tempfile.TemporaryDirectory(prefix="colstream-storage-") as tmp:
            large = build(label, options, big, Path(tmp))
            try:
                measured, _ = query_interleaved([large], big_queries)
            finally:
                large.store.close()
        full = measured[0]
        print(f"\n| {args.scale_pages} pages, float16 + row/col layout | query p50 ms | p95 ms "
              "| speed-up vs its full scan | top-1 = full scan |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for row in measured:
            speed_up = full.p50 / row.p50
            print(f"| {row.mode} | {row.p50:.1f} | {row.p95:.1f} | {speed_up:.1f}x | {row.top1_agreement:.0%} |")

if __name__ == "__main__":
    main()
