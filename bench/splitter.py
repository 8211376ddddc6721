"""Splitter throughput against a plain pypdfium2 render-and-encode loop.

    .venv/bin/python bench/splitter.py [--quick]

Measured (pages/s, same PDFs, same render size, same number of worker processes):

* ``splitter``: the real ``SplitterHandler`` with its ``StreamingRenderer`` (2 render
  processes, as ``build_splitter`` makes it), every page published as a ``PageTask`` to a real
  topic through the stage's producer, and the time includes the broker's acknowledgement of
  every page (``flush_or_raise``, the stage's durability fence before a commit).
* ``plain loop``: a ``multiprocessing.Pool`` of the same size; each task opens the PDF and
  renders a chunk of 8 pages with ``page.render(scale).to_pil()`` then JPEG q90, and returns
  the bytes to the parent. No Kafka, no checks, no claim check, no ordering.
* ``splitter, emit discarded``: the handler with the producer replaced by a no-op, to split
  the gap between rendering (pool, IPC, ordering) and Kafka (JSON + base64 + produce + ack).

Goal: splitter / plain loop >= 0.90. Runs alternate A B A B so machine drift hits both.
"""

from __future__ import annotations

import argparse
import io
import math
import multiprocessing
import time
from pathlib import Path

import _common
from _common import Report, Row, alternate, log, pairwise_ratios, spread

from colstream.consumers.splitter.stage import SplitterHandler
from colstream.consumers.splitter.workers import StreamingRenderer
from colstream.embedding.profile import render_target_for
from colstream.infra.blobstore import open_blob_store
from colstream.infra.kafka import OutRecord, ProducerClient, RecordPosition
from colstream.infra.settings import ColstreamSettings
from colstream.infra.stage_runner import RawRecord

PROCESSES = 2
CHUNK_PAGES = 8
JPEG_QUALITY = 90


def _plain_render_chunk(task: tuple[str, list[int], int]) -> list[bytes]:
    import pypdfium2 as pdfium

    path, pages, max_pixels = task
    pdf = pdfium.PdfDocument(path)
    out = []
    try:
        for index in pages:
            page = pdf[index]
            width, height = page.get_size()
            bitmap = page.render(scale=math.sqrt(max_pixels / (width * height)))
            buffer = io.BytesIO()
            bitmap.to_pil().save(buffer, format="JPEG", quality=JPEG_QUALITY)
            out.append(buffer.getvalue())
            page.close()
    finally:
        pdf.close()
    return out


class PlainLoop:
    """The yardstick: a process pool that renders and encodes, nothing else."""

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self.pool = multiprocessing.get_context("forkserver").Pool(PROCESSES)

    def run(self, docs: list[tuple[Path, int]]) -> int:
        tasks = [
            (str(path), list(range(start, min(start + CHUNK_PAGES, count))), self.max_pixels)
            for path, count in docs
            for start in range(0, count, CHUNK_PAGES)
        ]
        return sum(len(chunk) for chunk in self.pool.imap(_plain_render_chunk, tasks))

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


class SplitterUnderTest:
    def __init__(self, settings: ColstreamSettings) -> None:
        self.settings = settings
        self.renderer = StreamingRenderer(processes=PROCESSES, limits=settings.limits, chunk_pages=CHUNK_PAGES)
        self.handler = SplitterHandler(settings, open_blob_store(settings), self.renderer,
                                       render_target_for(settings.model))
        self.producer = ProducerClient(settings)
        self.offset = 0
        self.pages_emitted = 0

    def _emit(self, record: OutRecord) -> None:
        self.pages_emitted += 1
        self.producer.send(record)

    def _discard(self, record: OutRecord) -> None:
        self.pages_emitted += 1

    def run(self, uploads: list[tuple[str, bytes]], *, to_kafka: bool = True) -> int:
        self.pages_emitted = 0
        emit = self._emit if to_kafka else self._discard
        for key, value in uploads:
            # Offsets only need to grow: each run is a newer version of the same documents.
            self.offset += 1
            record = RawRecord(key, value, RecordPosition(self.settings.topics.uploads, 0, self.offset))
            self.handler.split(record, emit)
        if to_kafka:
            self.producer.flush_or_raise()
        return self.pages_emitted

    def close(self) -> None:
        self.producer.close()
        self.handler.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer pages and repeats (~1 min)")
    args = parser.parse_args()
    docs_n, pages_per_doc, repeats = (6, 30, 5) if args.quick else (10, 50, 9)

    settings = _common.bench_settings("splitter", _common.bootstrap_servers())
    target = render_target_for(settings.model)
    assert target.max_pixels is not None
    docs: list[tuple[Path, int]] = []
    uploads: list[tuple[str, bytes]] = []
    from colstream.schemas import UploadEvent, encode

    for n in range(docs_n):
        uri = _common.write_blob(settings, f"doc-{n}.pdf", _common.text_page_pdf(pages_per_doc, seed=n))
        docs.append((settings.blob.local_root / f"doc-{n}.pdf", pages_per_doc))
        uploads.append((f"doc-{n}", encode(UploadEvent(document_id=f"doc-{n}", blob_uri=uri))))
    total_pages = docs_n * pages_per_doc
    log(f"{docs_n} PDFs x {pages_per_doc} pages, render target {target}, {PROCESSES} processes")

    splitter = SplitterUnderTest(settings)
    plain = PlainLoop(target.max_pixels)
    try:
        # Warm both pools (processes started, PDFium loaded, broker connection up).
        assert splitter.run(uploads[:1]) == pages_per_doc
        assert plain.run(docs[:1]) == pages_per_doc

        def time_splitter() -> float:
            t0 = time.perf_counter()
            emitted = splitter.run(uploads)
            assert emitted == total_pages, f"splitter produced {emitted} of {total_pages} pages"
            rate = total_pages / (time.perf_counter() - t0)
            log(f"splitter -> kafka {rate:.1f} pages/s")
            return rate

        def time_plain() -> float:
            t0 = time.perf_counter()
            assert plain.run(docs) == total_pages
            rate = total_pages / (time.perf_counter() - t0)
            log(f"plain loop        {rate:.1f} pages/s")
            return rate

        split_rates, plain_rates = alternate(repeats, time_splitter, time_plain)
        discard_rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            assert splitter.run(uploads, to_kafka=False) == total_pages
            discard_rates.append(total_pages / (time.perf_counter() - t0))
            log(f"splitter, no kafka {discard_rates[-1]:.1f} pages/s")
    finally:
        splitter.close()
        plain.close()
        _common.drop_topics(settings)

    s, p, d = spread(split_rates), spread(plain_rates), spread(discard_rates)
    paired = pairwise_ratios(split_rates, plain_rates)
    report = Report("splitter", "python bench/splitter.py" + (" --quick" if args.quick else ""))
    # Pairing is what makes the ratio robust on a shared machine: each pair ran back to back.
    report.add(Row("splitter / plain loop (pairwise, median)", paired.median, "x", None, "", ">= 0.90",
                   paired.median >= 0.90, f"min {paired.min:.3f}, max {paired.max:.3f}; ratio of medians "
                   f"{s.median / p.median:.3f}"))
    report.add(Row("splitter -> real topic (pages/s, median)", s.median, "pages/s", p.median, "plain pypdfium2 loop",
                   "", None, f"splitter min {s.min:.1f}, plain min {p.min:.1f}"))
    report.add(Row("splitter, emit discarded (pages/s, median)", d.median, "pages/s", p.median,
                   "plain pypdfium2 loop", "", None, "render path alone, no Kafka"))
    report.details = {
        "pages_per_run": total_pages, "documents": docs_n, "processes": PROCESSES, "render_target": str(target),
        "splitter_pages_per_s": vars(s), "plain_pages_per_s": vars(p), "splitter_no_kafka_pages_per_s": vars(d),
        "pairwise_ratio": vars(paired),
    }
    report.print_and_save()


if __name__ == "__main__":
    main()
