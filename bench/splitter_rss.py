"""The splitter's memory while a 1,000-page PDF streams through it.

    .venv/bin/python bench/splitter_rss.py [--quick]

The real ``SplitterHandler`` (2 render processes) renders a 1,000-page report-like PDF and
publishes every page to a real topic, acknowledged by the broker at the end. A sampler thread
reads, every 50 ms, the RSS and PSS of this process and of all its descendants (the render
workers and the forkserver they come from). PSS splits shared pages between processes, so its
sum is the honest total; the RSS sum double-counts shared libraries and is an upper bound.

Baseline: the same processes idle (pool started and warm) before the document arrives.
Goals: peak below 500 MB, and flat: the total at 100% of the pages within 10% of the total
at 10%. ``--quick`` only shortens the idle sampling; the document is always 1,000 pages.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from dataclasses import dataclass

import _common
import psutil
from _common import Report, Row, log

from colstream.consumers.splitter.stage import SplitterHandler
from colstream.consumers.splitter.workers import StreamingRenderer
from colstream.embedding.profile import render_target_for
from colstream.infra.blobstore import open_blob_store
from colstream.infra.kafka import OutRecord, ProducerClient, RecordPosition
from colstream.infra.stage_runner import RawRecord
from colstream.schemas import UploadEvent, encode

PAGES = 1000
MB = 1024 * 1024


@dataclass(frozen=True)
class Sample:
    at: float
    pages: int
    rss: int  # this process + descendants
    pss: int
    parent_rss: int
    processes: int


class Sampler:
    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.me = psutil.Process(os.getpid())
        self.pages = 0
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def sample(self) -> Sample:
        rss = pss = 0
        processes = [self.me, *self.me.children(recursive=True)]
        parent_rss = 0
        for process in processes:
            try:
                info = process.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            if process.pid == self.me.pid:
                parent_rss = info.rss
        return Sample(time.perf_counter(), self.pages, rss, pss, parent_rss, len(processes))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.interval_s)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join()
        return self.samples


def at_fraction(samples: list[Sample], fraction: float) -> Sample:
    wanted = fraction * PAGES
    return next((s for s in samples if s.pages >= wanted), samples[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter idle sampling")
    args = parser.parse_args()

    settings = _common.bench_settings("rss", _common.bootstrap_servers())
    settings.limits.max_pages = max(settings.limits.max_pages, PAGES)
    t0 = time.perf_counter()
    pdf = _common.text_page_pdf(PAGES, seed=3)
    uri = _common.write_blob(settings, "thousand.pdf", pdf)
    warm_uri = _common.write_blob(settings, "one.pdf", _common.text_page_pdf(1, seed=4))
    log(f"{PAGES}-page PDF, {len(pdf) / MB:.1f} MB, built in {time.perf_counter() - t0:.1f} s")

    renderer = StreamingRenderer(processes=2, limits=settings.limits)
    handler = SplitterHandler(settings, open_blob_store(settings), renderer, render_target_for(settings.model))
    producer = ProducerClient(settings)
    sampler = Sampler()
    offset = 0

    def emit(record: OutRecord) -> None:
        sampler.pages += 1
        producer.send(record)

    def split(doc: str, blob: str) -> None:
        nonlocal offset
        offset += 1
        value = encode(UploadEvent(document_id=doc, blob_uri=blob))
        handler.split(RawRecord(doc, value, RecordPosition(settings.topics.uploads, 0, offset)), emit)

    try:
        split("warm", warm_uri)  # starts the pool and the producer: the idle state a stage sits in
        producer.flush_or_raise()
        sampler.pages = 0
        idle = [sampler.sample()]
        for _ in range(10 if args.quick else 40):
            time.sleep(0.05)
            idle.append(sampler.sample())
        sampler.start()
        started = time.perf_counter()
        split("thousand", uri)
        producer.flush_or_raise()
        elapsed = time.perf_counter() - started
        samples = sampler.stop()
        peak_outstanding = renderer.peak_outstanding_pages
    finally:
        producer.close()
        handler.close()
        _common.drop_topics(settings)

    assert sampler.pages == PAGES, f"{sampler.pages} of {PAGES} pages emitted"
    idle_pss = max(s.pss for s in idle)
    idle_rss = max(s.rss for s in idle)
    peak = max(samples, key=lambda s: s.pss)
    peak_rss = max(s.rss for s in samples)
    points = {f: at_fraction(samples, f) for f in (0.1, 0.5, 1.0)}
    growth = points[1.0].pss / points[0.1].pss - 1
    log(f"{PAGES} pages in {elapsed:.1f} s ({PAGES / elapsed:.0f} pages/s), {len(samples)} samples, "
        f"{peak.processes} processes, at most {peak_outstanding} pages dispatched and not yet published")
    for fraction, sample in points.items():
        log(f"at {fraction:>4.0%} of pages: PSS {sample.pss / MB:.0f} MB, RSS sum {sample.rss / MB:.0f} MB, "
            f"parent RSS {sample.parent_rss / MB:.0f} MB")

    report = Report("splitter_rss", "python bench/splitter_rss.py" + (" --quick" if args.quick else ""))
    report.add(Row("peak memory, parent + workers (PSS sum)", peak.pss / MB, "MB", idle_pss / MB, "same processes idle",
                   "< 500 MB", peak.pss < 500 * MB, f"RSS sum peak {peak_rss / MB:.0f} MB (idle {idle_rss / MB:.0f})"))
    report.add(Row("growth from 10% to 100% of pages (PSS)", growth * 100, "%", None, "", "flat: <= 10%",
                   growth <= 0.10,
                   " / ".join(f"{f:.0%}: {s.pss / MB:.0f} MB" for f, s in points.items())))
    report.details = {
        "pages": PAGES, "pdf_bytes": len(pdf), "seconds": elapsed, "pages_per_s": PAGES / elapsed,
        "idle_pss_mb": idle_pss / MB, "idle_rss_mb": idle_rss / MB, "peak_pss_mb": peak.pss / MB,
        "peak_rss_sum_mb": peak_rss / MB, "peak_outstanding_pages": peak_outstanding,
        "curve": {f"{int(f * 100)}%": {"pss_mb": s.pss / MB, "rss_sum_mb": s.rss / MB,
                                        "parent_rss_mb": s.parent_rss / MB} for f, s in points.items()},
        # Every 10th sample keeps the file small and still shows the shape.
        "trace": [(round(s.at - started, 2), s.pages, round(s.pss / MB, 1)) for s in samples[::10]],
    }
    report.print_and_save()


if __name__ == "__main__":
    main()
