"""Prometheus metrics every stage and the API export, and the small API that records them.

All metrics live in one registry (``prometheus_client``'s default), labelled by
``stage``, so ``colstream run all`` serves every stage's figures (and the API's)
from one ``/metrics`` while a stage run alone serves its own. Call sites use
:class:`StageMetrics`, never the metric objects::

    metrics = StageMetrics("splitter")
    metrics.records_consumed(len(batch))
    with metrics.time_batch(len(batch)):
        ...

``colstream_pages_pending`` (pages rendered but not yet indexed) is computed from
the broker, not from counters that reset on every restart: it is the embedder
group's lag on the pages topic plus the sink group's lag on the vectors topic,
since every record on those topics is one page. :class:`PagesPendingProbe`
recomputes it in the background so a scrape never waits on Kafka.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from colstream.infra.settings import ColstreamSettings

log = logging.getLogger(__name__)

# Seconds: from a 10 ms micro-batch to a 15 min render of a 2,000-page document.
_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

RECORDS_CONSUMED = Counter(
    "colstream_records_consumed", "Records a stage consumed from its input topic.", ["stage"]
)
RECORDS_PRODUCED = Counter(
    "colstream_records_produced", "Records a stage produced to its output topics (dead letters included).", ["stage"]
)
DEAD_LETTERS = Counter(
    "colstream_dead_letters", "Records a stage sent to the dead-letter topic, by error type.", ["stage", "error_type"]
)
CONSUMER_LAG = Gauge(
    "colstream_consumer_lag",
    "Records between a stage's consumer position and the end of each assigned partition.",
    ["stage", "topic", "partition"],
)
BATCH_SIZE = Histogram(
    "colstream_batch_size", "Records per micro-batch handed to a stage's handler.", ["stage"], buckets=_SIZE_BUCKETS
)
BATCH_SECONDS = Histogram(
    "colstream_batch_seconds",
    "Seconds from handing a batch to the handler until its outputs were produced.",
    ["stage"],
    buckets=_SECONDS_BUCKETS,
)
PAGES_INDEXED = Counter("colstream_pages_indexed", "Pages the sink wrote to Qdrant.", ["stage"])
PAGES_PENDING = Gauge(
    "colstream_pages_pending",
    "Pages rendered but not yet indexed: the embedder group's lag on the pages topic plus the sink "
    "group's lag on the vectors topic. Every reporter computes the same figure from the broker.",
    ["stage"],
)
DOCUMENTS_IN_FLIGHT = Gauge(
    "colstream_documents_in_flight", "Distinct documents in the batches a stage is working on.", ["stage"]
)
EMBED_FORWARD_SECONDS = Histogram(
    "colstream_embed_forward_seconds",
    "Seconds per model forward pass (one micro-batch on the device).",
    ["stage"],
    buckets=_SECONDS_BUCKETS,
)
SINK_WRITE_SECONDS = Histogram(
    "colstream_sink_write_seconds",
    "Seconds per durable sink write (purges, upserts and document records of one batch).",
    ["stage"],
    buckets=_SECONDS_BUCKETS,
)

HTTP_REQUESTS = Counter(
    "colstream_http_requests", "HTTP requests the API answered, by route template and status.",
    ["stage", "method", "route", "status"],
)
HTTP_REQUEST_SECONDS = Histogram(
    "colstream_http_request_seconds", "Seconds the API took to answer a request, by route template.",
    ["stage", "method", "route"], buckets=_SECONDS_BUCKETS,
)


def observe_http_request(method: str, route: str, status: int, seconds: float) -> None:
    """One answered API request (``route`` is the template, never the raw path: bounded labels)."""
    HTTP_REQUESTS.labels("api", method, route, str(status)).inc()
    HTTP_REQUEST_SECONDS.labels("api", method, route).observe(seconds)


class GpuMemoryCollector(Collector):
    """``colstream_gpu_memory_bytes`` per CUDA device, read at scrape time.

    Only where torch is already loaded and CUDA is initialised: a scrape must never
    import torch or create a CUDA context in a process that has none."""

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "colstream_gpu_memory_bytes", "GPU memory held by this process, per device.", labels=["device", "kind"]
        )
        torch: Any = sys.modules.get("torch")
        if torch is not None:
            try:
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    for index in range(torch.cuda.device_count()):
                        device = f"cuda:{index}"
                        family.add_metric([device, "allocated"], float(torch.cuda.memory_allocated(index)))
                        family.add_metric([device, "reserved"], float(torch.cuda.memory_reserved(index)))
            except Exception as exc:  # a scrape must not fail because a driver call did
                log.debug("GPU memory not readable: %s", exc)
        yield family


REGISTRY.register(GpuMemoryCollector())


class StageMetrics:
    """The figures one stage records; cheap to create, so call sites may build one per use."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._consumed = RECORDS_CONSUMED.labels(stage)
        self._produced = RECORDS_PRODUCED.labels(stage)
        self._batch_size = BATCH_SIZE.labels(stage)
        self._batch_seconds = BATCH_SECONDS.labels(stage)
        self._in_flight = DOCUMENTS_IN_FLIGHT.labels(stage)
        self._lag_series: set[tuple[str, str]] = set()
        self._lag_lock = threading.Lock()

    def records_consumed(self, n: int = 1) -> None:
        self._consumed.inc(n)

    def records_produced(self, n: int = 1) -> None:
        self._produced.inc(n)

    def dead_letter(self, error_type: str) -> None:
        DEAD_LETTERS.labels(self.stage, error_type).inc()

    def batch_done(self, size: int, seconds: float) -> None:
        self._batch_size.observe(size)
        self._batch_seconds.observe(seconds)

    @contextmanager
    def time_batch(self, size: int) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.batch_done(size, time.perf_counter() - started)

    def documents_in_flight(self, n: int) -> None:
        self._in_flight.set(n)

    def pages_indexed(self, n: int) -> None:
        PAGES_INDEXED.labels(self.stage).inc(n)

    def embed_forward(self, seconds: float) -> None:
        EMBED_FORWARD_SECONDS.labels(self.stage).observe(seconds)

    def sink_write(self, seconds: float) -> None:
        SINK_WRITE_SECONDS.labels(self.stage).observe(seconds)

    # -- consumer lag from librdkafka's statistics ------------------------------------
    def consumer_lag(self, lags: dict[tuple[str, int], int]) -> None:
        """Set the lag of every assigned partition; partitions no longer reported are dropped."""
        with self._lag_lock:
            current = {(topic, str(partition)) for topic, partition in lags}
            for gone_topic, gone_partition in self._lag_series - current:
                with suppress(KeyError):
                    CONSUMER_LAG.remove(self.stage, gone_topic, gone_partition)
            for (topic, partition), lag in lags.items():
                CONSUMER_LAG.labels(self.stage, topic, str(partition)).set(lag)
            self._lag_series = current

    def on_kafka_statistics(self, stats_json: str) -> None:
        """``stats_cb`` for a consumer: librdkafka reports ``consumer_lag`` per partition."""
        self.consumer_lag(lags_from_statistics(stats_json))

    def consumer_config(self, statistics_interval_ms: int) -> dict[str, Any]:
        """Extra consumer configuration that feeds :meth:`on_kafka_statistics`."""
        if statistics_interval_ms <= 0:
            return {}
        return {"statistics.interval.ms": statistics_interval_ms, "stats_cb": self.on_kafka_statistics}


def lags_from_statistics(stats_json: str) -> dict[tuple[str, int], int]:
    """Per-partition consumer lag from a librdkafka statistics document (``-1`` = unknown, left out)."""
    try:
        stats = json.loads(stats_json)
    except ValueError:
        return {}
    lags: dict[tuple[str, int], int] = {}
    for topic, body in (stats.get("topics") or {}).items():
        for partition, p in (body.get("partitions") or {}).items():
            if int(partition) < 0 or p.get("fetch_state") in (None, "none", "stopped"):
                continue
            lag = p.get("consumer_lag", -1)
            if isinstance(lag, int) and lag >= 0:
                lags[(topic, int(partition))] = lag
    return lags


# -- pages pending -----------------------------------------------------------------------
GroupLag = Callable[[str, str], int]


def group_lag(settings: ColstreamSettings, group: str, topic: str, timeout_s: float = 10.0) -> int:
    """Records on ``topic`` past ``group``'s committed offsets (a partition without a
    commit counts from its start, as ``auto.offset.reset=earliest`` reads it)."""
    from colstream.infra.kafka import committed_offsets

    total = 0
    for committed, low, high in committed_offsets(settings, group, topic, timeout_s).values():
        total += max(0, high - max(committed, low))
    return total


def pages_pending(settings: ColstreamSettings, lag: GroupLag | None = None) -> int:
    """Pages rendered but not yet indexed, from the consumer groups' committed offsets."""
    lag = lag or (lambda group, topic: group_lag(settings, group, topic))
    prefix = settings.consumer_group_prefix
    return lag(f"{prefix}embedder", settings.topics.pages) + lag(f"{prefix}sink", settings.topics.vectors)


class PagesPendingProbe:
    """Recomputes ``colstream_pages_pending`` every ``interval_s`` in a daemon thread;
    a failed computation keeps the last value and logs once per outage."""

    def __init__(self, settings: ColstreamSettings, stage: str, *, lag: GroupLag | None = None,
                 interval_s: float | None = None) -> None:
        self.settings = settings
        self.gauge = PAGES_PENDING.labels(stage)
        self.interval_s = interval_s or settings.metrics.pending_interval_s
        self._lag = lag
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self.last_value: int | None = None

    def refresh(self) -> int | None:
        try:
            value = pages_pending(self.settings, self._lag)
        except Exception as exc:
            if not self._failing:
                log.warning("pages pending not computed: %s", exc)
            self._failing = True
            return None
        self._failing = False
        self.gauge.set(value)
        self.last_value = value
        return value

    def start(self) -> PagesPendingProbe:
        def loop() -> None:
            while not self._stop.is_set():
                self.refresh()
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=loop, name="metrics-pages-pending", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


def render_latest(registry: CollectorRegistry = REGISTRY) -> bytes:
    from prometheus_client import generate_latest

    return generate_latest(registry)
