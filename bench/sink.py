"""The sink against a plain batch upsert into the same store, plus storage options.

    .venv/bin/python bench/sink.py [--quick]

1. Throughput (pages/s) on identical page multivectors (~750 tokens x 128, float16, as the
   embedder publishes them), in batches of 64 (the sink stage's batch size):

   * ``sink``: ``SinkHandler.write`` on the raw ``documents.vectors`` record values: JSON
     decode, base64, NaN/shape checks, latest-wins planning (``SinkCore``), purge of older
     versions, upsert into a fresh Qdrant Edge shard through ``EdgeVectorStore``, then the
     per-document records; durable (flushed) when each batch returns.
   * ``plain upsert``: the same points, already decoded to float16 arrays, upserted with
     ``qdrant_edge`` directly into a fresh shard of the same configuration (float16 multivector,
     MaxSim, HNSW off, the same two payload indexes), 64 points per update, one flush per batch:
     the same durability, none of the pipeline's bookkeeping.

   Goal: sink / plain upsert >= 0.90.

2. Bytes stored per page by the sink in the default layout (float16, every token): blocks
   allocated under the pages shard's ``segments`` directory, minus the empty shard, and the
   WAL beside it. Every storage option (float32, float16, hierarchical token pooling,
   row/column prefetch) with its query latency is measured by ``bench/storage_options.py``.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import _common
import numpy as np
import qdrant_edge as edge
from _common import Report, Row, alternate, log, pairwise_ratios, spread

from colstream.consumers.sink.stage import SinkHandler
from colstream.infra.kafka import RecordPosition
from colstream.infra.settings import ColstreamSettings
from colstream.infra.stage_runner import RawRecord
from colstream.infra.vectorstore import page_point_id
from colstream.infra.vectorstore_edge import EdgeVectorStore
from colstream.schemas import DocumentRef, PageVectors, encode

BATCH = 64  # build_sink's batch_size
DIM = 128
PAGES_PER_DOC = 10
MODEL = "bench/colqwen2"


def make_pages(pages: int, seed: int = 0) -> list[tuple[DocumentRef, int, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for n in range(pages):
        doc, page = divmod(n, PAGES_PER_DOC)
        ref = DocumentRef(document_id=f"doc-{doc}", version=1000 + doc, filename=f"doc-{doc}.pdf",
                          blob_uri=f"file:///blobs/doc-{doc}.pdf")
        tokens = int(rng.integers(700, 760))
        vectors = rng.standard_normal((tokens, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        out.append((ref, page + 1, vectors.astype(np.float16)))
    return out


def as_records(pages: list[tuple[DocumentRef, int, np.ndarray]], topic: str) -> list[RawRecord]:
    records = []
    for offset, (ref, page, vectors) in enumerate(pages):
        message = PageVectors.from_array(document=ref, page_number=page, total_pages=PAGES_PER_DOC, model=MODEL,
                                         array=vectors)
        records.append(RawRecord(ref.document_id, encode(message), RecordPosition(topic, 0, offset)))
    return records


STORED: dict[str, float] = {}


def run_sink(settings: ColstreamSettings, records: list[RawRecord], path: Path) -> float:
    shutil.rmtree(path, ignore_errors=True)
    settings = settings.updated(qdrant={"path": path})
    store = EdgeVectorStore(settings.qdrant)
    # The pages collection is created for an index of a DIM-wide model (as build_sink does).
    store.ensure_collections(dim=DIM)
    pages_dir = path / store.index_name
    empty = {part: _common.dir_bytes(pages_dir / part) for part in ("segments", "wal")}
    handler = SinkHandler(settings, store)
    try:
        t0 = time.perf_counter()
        completed = 0
        for start in range(0, len(records), BATCH):
            outputs = handler.write(records[start : start + BATCH])
            completed += sum(1 for o in outputs if o.topic == settings.topics.indexed)
        elapsed = time.perf_counter() - t0
        assert store.count_pages() == len(records), "sink lost pages"
        assert completed == len(records) // PAGES_PER_DOC, f"{completed} documents completed"
    finally:
        handler.close()
    for part in ("segments", "wal"):
        STORED[part] = (_common.dir_bytes(pages_dir / part) - empty[part]) / len(records)
    shutil.rmtree(path, ignore_errors=True)
    return len(records) / elapsed


def plain_config() -> edge.EdgeConfig:
    return edge.EdgeConfig(
        vectors=edge.EdgeVectorParams(
            size=DIM,
            distance=edge.Distance.Cosine,
            multivector_config=edge.MultiVectorConfig(edge.MultiVectorComparator.MaxSim),
            datatype=edge.VectorStorageDatatype.Float16,
            hnsw_config=edge.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10_000),
        )
    )


def run_plain(pages: list[tuple[DocumentRef, int, np.ndarray]], path: Path) -> float:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    shard = edge.EdgeShard.create(str(path), plain_config())
    shard.update(edge.UpdateOperation.create_field_index("document_id", edge.PayloadSchemaType.Keyword))
    shard.update(edge.UpdateOperation.create_field_index("version", edge.PayloadSchemaType.Integer))
    try:
        t0 = time.perf_counter()
        for start in range(0, len(pages), BATCH):
            points = [
                edge.Point(
                    page_point_id(ref.document_id, page),
                    vectors.astype(np.float32).tolist(),
                    {"document_id": ref.document_id, "version": ref.version, "page_number": page,
                     "total_pages": PAGES_PER_DOC, "filename": ref.filename, "blob_uri": ref.blob_uri,
                     "model": MODEL},
                )
                for ref, page, vectors in pages[start : start + BATCH]
            ]
            shard.update(edge.UpdateOperation.upsert_points(points))
            shard.flush()
        elapsed = time.perf_counter() - t0
        assert shard.count(edge.CountRequest(exact=True)) == len(pages)
    finally:
        shard.close()
    shutil.rmtree(path, ignore_errors=True)
    return len(pages) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer pages and repeats (~1-2 min)")
    args = parser.parse_args()
    pages_n, repeats = (320, 5) if args.quick else (640, 7)

    settings = _common.bench_settings("sink", "unused:9092", create_topics=False)
    pages = make_pages(pages_n)
    records = as_records(pages, settings.topics.vectors)
    mean_tokens = sum(v.shape[0] for _, _, v in pages) / len(pages)
    log(f"{pages_n} pages ({pages_n // PAGES_PER_DOC} documents), mean {mean_tokens:.0f} tokens x {DIM}, "
        f"{sum(len(r.value or b'') for r in records) / len(records) / 1024:.0f} KiB per vectors record")
    root = settings.state_dir

    # Warm-up, not counted: imports, allocator, page cache.
    run_sink(settings, records[:BATCH], root / "warm-sink")
    run_plain(pages[:BATCH], root / "warm-plain")

    def time_sink() -> float:
        rate = run_sink(settings, records, root / "sink")
        log(f"sink         {rate:.1f} pages/s")
        return rate

    def time_plain() -> float:
        rate = run_plain(pages, root / "plain")
        log(f"plain upsert {rate:.1f} pages/s")
        return rate

    sink_rates, plain_rates = alternate(repeats, time_sink, time_plain)
    shutil.rmtree(root, ignore_errors=True)

    s, p = spread(sink_rates), spread(plain_rates)
    paired = pairwise_ratios(sink_rates, plain_rates)
    report = Report("sink", "python bench/sink.py" + (" --quick" if args.quick else ""))
    # Pairing is what makes the ratio robust on a shared machine: each pair ran back to back.
    report.add(Row("sink / plain upsert (pairwise, median)", paired.median, "x", None, "", ">= 0.90",
                   paired.median >= 0.90, f"min {paired.min:.3f}, max {paired.max:.3f}; ratio of medians "
                   f"{s.median / p.median:.3f}"))
    report.add(Row("sink -> Edge (pages/s, median)", s.median, "pages/s", p.median, "plain Edge batch upsert",
                   "", None, f"sink min {s.min:.1f}, plain min {p.min:.1f}"))
    raw = mean_tokens * DIM * 2
    report.add(Row("bytes stored per page, default layout (segments)", STORED["segments"], "B", raw,
                   "the float16 vectors alone", "", None,
                   f"WAL +{STORED['wal'] / 1024:.0f} KiB/page; other layouts: bench/storage_options.py"))
    report.details = {"pages": pages_n, "mean_tokens": mean_tokens, "batch": BATCH,
                      "sink_pages_per_s": vars(s), "plain_pages_per_s": vars(p), "pairwise_ratio": vars(paired),
                      "stored_bytes_per_page": STORED, "raw_vector_bytes_per_page": raw}
    report.print_and_save()


if __name__ == "__main__":
    main()
