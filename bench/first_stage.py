"""First stages on a Qdrant server against exact MaxSim over the same stored vectors.

    .venv/bin/python bench/first_stage.py [--pages 10000] [--queries 100] [--quick]

Pages are real rendered pages (report-like PDFs through the splitter's PdfSession at the
model's render target) embedded with the tiny ColQwen2 checkpoint, **random weights**:
the vectors measure how well each first stage approximates exact MaxSim over the same
vectors, not retrieval quality. Queries are text queries embedded by the same model.

Options, each built from ``QdrantSettings`` through ``QdrantServerVectorStore`` exactly
as the sink and the API use them:

* ``quantization=int8``: scalar int8 copies in RAM, top ``oversampling`` x k rescored;
* ``quantization=binary``: 1 bit per number in RAM, oversampled and rescored;
* ``mean_pooled_prefetch=true``: row and column mean vectors (HNSW) as the first stage,
  reranked on the full multivector.

The reference for each option is exact MaxSim over the same collection (quantization
ignored, or no prefetch). recall@10 = |approximate top 10 & exact top 10| / 10, averaged
over the queries. Latency is per query, after warm-up, one client, p50 and p99.
Bytes: the collection's directory on the server per page, and the part of it in the
quantized files (what ``always_ram`` keeps in memory).

Needs the Qdrant server binary (``COLSTREAM_QDRANT_BINARY`` or ../shared/tools) or
``QDRANT_URL``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import _common  # the benchmarks' shared helpers (bench/_common.py)
import numpy as np

from colstream.infra.settings import ColstreamSettings, QdrantSettings
from colstream.infra.vectorstore import IndexModel, PagePoint, PatchGrid

PAGES_PER_PDF = 50
EMBED_BATCH = 8
WARMUP_QUERIES = 5
TOP_K = 10
OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("scalar int8 + rescoring (oversampling 3)", {"quantization": "int8", "quantization_oversampling": 3.0}),
    ("binary + rescoring (oversampling 3)", {"quantization": "binary", "quantization_oversampling": 3.0}),
    ("row/column mean-pooled prefetch + rerank", {"mean_pooled_prefetch": True}),
]


def embed_corpus(settings: ColstreamSettings, pages: int, cache: Path) -> tuple[list[np.ndarray], list[Any]]:
    """Render and embed ``pages`` pages once; later runs read them from ``cache``."""
    if cache.exists():
        stored = np.load(cache, allow_pickle=True)
        return list(stored["vectors"]), list(stored["grids"])
    from colstream.consumers.splitter.render import PdfSession
    from colstream.embedding.engine import EmbedItem, PipelinedEmbedder
    from colstream.embedding.model import load_model
    from colstream.embedding.profile import render_target_for

    target = render_target_for(settings.model)
    vectors: list[np.ndarray] = []
    grids: list[Any] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, PipelinedEmbedder(
        load_model(settings.model), max_batch_size=EMBED_BATCH, preprocess_workers=1
    ) as engine:
        for seed in range((pages + PAGES_PER_PDF - 1) // PAGES_PER_PDF):
            count = min(PAGES_PER_PDF, pages - seed * PAGES_PER_PDF)
            path = Path(tmp) / f"report-{seed}.pdf"
            path.write_bytes(_common.text_page_pdf(count, seed=seed))
            session = PdfSession(path, settings.limits)
            try:
                images = [session.render(n, target).data for n in range(1, count + 1)]
            finally:
                session.close()
            futures = [engine.submit([EmbedItem(n, data) for n, data in enumerate(images[i : i + EMBED_BATCH])])
                       for i in range(0, len(images), EMBED_BATCH)]
            for future in futures:
                for result in future.result():
                    assert result.ok and result.vectors is not None, result.error
                    vectors.append(result.vectors)
                    grids.append(result.grid)
            _common.log(f"embedded {len(vectors)}/{pages} pages ({time.perf_counter() - started:.0f} s)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, vectors=np.array(vectors, dtype=object), grids=np.array(grids, dtype=object))
    return vectors, grids


def queries(settings: ColstreamSettings, count: int) -> list[np.ndarray]:
    from colstream.embedding.model import load_model

    model = load_model(settings.model)
    words = _common._LOREM.replace(";", "").replace(".", "").split()
    texts = [" ".join([*words[(i * 5) % len(words):][:4], f"report {i % 97}", f"page {i % 50 + 1}"])
             for i in range(count)]
    return [v.astype(np.float32) for v in model.embed_queries(texts)]


def wait_until_indexed(url: str, collection: str, timeout_s: float = 900.0) -> None:
    from qdrant_client import QdrantClient
    from qdrant_client import models as qm

    client = QdrantClient(url=url, timeout=60)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = client.get_collection(collection)
        if info.status == qm.CollectionStatus.GREEN:
            return
        time.sleep(1.0)
    raise TimeoutError(f"{collection} still optimizing after {timeout_s:.0f} s")


def collection_bytes(storage: Path | None, collection: str) -> tuple[int | None, int | None]:
    if storage is None:
        return None, None
    root = storage / "collections" / collection
    # Allocated blocks, not file sizes: Qdrant preallocates and memory-maps sparse files.
    files = [f for f in root.rglob("*") if f.is_file()]
    total = sum(f.stat().st_blocks * 512 for f in files)
    quantized = sum(f.stat().st_blocks * 512 for f in files if "quantiz" in str(f.relative_to(root)))
    return total, quantized or None


def timed(run: Any, query_vectors: list[np.ndarray]) -> tuple[list[list[tuple[str, int]]], list[float]]:
    for q in query_vectors[:WARMUP_QUERIES]:
        run(q)
    results, latencies = [], []
    for q in query_vectors:
        started = time.perf_counter()
        hits = run(q)
        latencies.append((time.perf_counter() - started) * 1000)
        results.append([(p["document_id"], int(p["page_number"])) for _, p in hits])
    return results, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="1,000 pages, 30 queries")
    args = parser.parse_args()
    pages, query_count = (1_000, 30) if args.quick else (args.pages, args.queries)

    from colstream.app import with_tiny_model
    from colstream.infra.vectorstore_qdrant import QdrantServerVectorStore
    from colstream.testing.qdrant_server import find_qdrant_binary, qdrant_server

    settings = with_tiny_model(ColstreamSettings(state_dir=_common.STATE / "first-stage"))
    vectors, grids = embed_corpus(settings, pages, _common.STATE / f"first-stage-{pages}.npz")
    query_vectors = queries(settings, query_count)
    dim = int(vectors[0].shape[1])
    tokens = statistics.mean(v.shape[0] for v in vectors)
    model = IndexModel(family="colqwen2", model_id="tiny-colqwen2 (random weights)", revision="local", dim=dim)
    points = [PagePoint(document_id=f"report-{i // PAGES_PER_PDF}", version=1, page_number=i % PAGES_PER_PDF + 1,
                        total_pages=PAGES_PER_PDF, filename=None, blob_uri=None, model=model.label,
                        vectors=v.astype(np.float16),
                        grid=PatchGrid(start=g.start, rows=g.rows, cols=g.cols) if g is not None else None)
              for i, (v, g) in enumerate(zip(vectors, grids, strict=True))]
    _common.log(f"{len(points)} pages, {tokens:.0f} tokens x {dim} per page on average; {len(query_vectors)} queries")

    rows = []
    with ExitStack() as stack:
        storage: Path | None = None
        url = os.environ.get("QDRANT_URL")
        if not url:
            binary = find_qdrant_binary(_common.REPO)
            if binary is None:
                raise SystemExit("no Qdrant server: set QDRANT_URL or COLSTREAM_QDRANT_BINARY")
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qdrant-bench-")))
            url = stack.enter_context(qdrant_server(binary, home))
            storage = home / "storage"
        for label, options in OPTIONS:
            alias = f"first_stage_{time.monotonic_ns()}"
            qsettings = QdrantSettings(url=url, collection=alias, records_collection=f"{alias}_records", **options)
            store = QdrantServerVectorStore(qsettings)
            store.ensure_collections(model=model)
            started = time.perf_counter()
            for i in range(0, len(points), 64):
                store.upsert_pages(points[i : i + 64])
            write_s = time.perf_counter() - started
            wait_until_indexed(url, store.index_name)
            reference = (partial(store.search, limit=TOP_K, prefetch=False) if options.get("mean_pooled_prefetch")
                         else partial(store.search, limit=TOP_K, exact=True))
            exact, exact_ms = timed(reference, query_vectors)
            approximate, approximate_ms = timed(partial(store.search, limit=TOP_K), query_vectors)
            recall = statistics.mean(
                len(set(a) & set(e)) / max(1, len(e)) for a, e in zip(approximate, exact, strict=True)
            )
            total, quantized = collection_bytes(storage, store.index_name)
            rows.append((label, recall, total, quantized, approximate_ms, exact_ms, write_s))
            store.close()

    print()
    print(f"{len(points)} rendered pages, tiny ColQwen2 (RANDOM WEIGHTS), {tokens:.0f} tokens x {dim} per page; "
          f"{len(query_vectors)} queries, top {TOP_K}; {_common.machine()}")
    print()
    print("| first stage | recall@10 vs exact MaxSim | collection bytes/page | of which quantized | "
          "p50 ms | p99 ms | exact p50 ms | exact p99 ms | speed-up (p50) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, recall, total, quantized, approx_ms, exact_ms, _write in rows:
        per_page = f"{total / len(points) / 1024:,.1f} KiB" if total else "n/a"
        q_page = f"{quantized / len(points) / 1024:,.1f} KiB" if quantized else "n/a"
        a50, a99 = _common.percentile(approx_ms, 50), _common.percentile(approx_ms, 99)
        e50, e99 = _common.percentile(exact_ms, 50), _common.percentile(exact_ms, 99)
        print(f"| {label} | {recall:.3f} | {per_page} | {q_page} | {a50:.1f} | {a99:.1f} | {e50:.1f} | {e99:.1f} | "
              f"{e50 / a50:.2f}x |")


if __name__ == "__main__":
    main()
