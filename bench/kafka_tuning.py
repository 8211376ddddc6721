"""Producer and consumer settings for page- and vector-sized messages, against librdkafka's defaults.

    .venv/bin/python bench/kafka_tuning.py [--quick]

Messages are the real ones: ``PageTask`` JSON of report-like pages rendered at the ColQwen2
size (JPEG q90, base64 inline) and ``PageVectors`` JSON of 750 x 128 float16 multivectors
(base64), many distinct ones so that compression cannot profit from repeats.

Producer (acks=all, idempotent, as ``KafkaSettings.producer_config`` builds it), per config:

* ``stream``: N messages produced back to back, then one flush: MB/s of payload, the CPU
  seconds this process spent (librdkafka's threads included; compression happens here),
  and the bytes that went on the wire (librdkafka's own ``txbytes`` statistic).
* ``stage``: what a stage does per micro-batch: 8 messages, then wait for every
  acknowledgement (``flush_or_raise``); median and worst milliseconds per batch.

Consumer: a pre-filled page topic drained with ``consume(64)`` from assigned partitions (no
group join in the clock) under different ``fetch.max.bytes`` / ``max.partition.fetch.bytes``.

Configs run in rounds (every config once per round), so drift hits them all alike; medians
are reported. The baseline is librdkafka's default (linger.ms 5, no compression).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

import _common
import numpy as np
from _common import Report, Row, log
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import NewTopic

from colstream.consumers.splitter.render import PdfSession
from colstream.embedding.profile import render_target_for
from colstream.infra.kafka import admin_client
from colstream.infra.settings import ColstreamSettings
from colstream.schemas import DocumentRef, PageTask, PageVectors, encode

MB = 1024 * 1024
STAGE_BATCH = 8

PRODUCER_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("librdkafka default (linger 5, none)", {"linger.ms": 5, "batch.size": 1_000_000, "compression.type": "none"}),
    ("linger 0, none", {"linger.ms": 0, "compression.type": "none"}),
    ("linger 20, none", {"linger.ms": 20, "compression.type": "none"}),
    ("linger 100, none", {"linger.ms": 100, "compression.type": "none"}),
    ("linger 20, batch 16 KiB, none", {"linger.ms": 20, "batch.size": 16_384, "compression.type": "none"}),
    ("linger 20, lz4", {"linger.ms": 20, "compression.type": "lz4"}),
    ("linger 20, zstd", {"linger.ms": 20, "compression.type": "zstd"}),
    ("linger 20, snappy", {"linger.ms": 20, "compression.type": "snappy"}),
    ("linger 20, gzip", {"linger.ms": 20, "compression.type": "gzip"}),
]

CONSUMER_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("librdkafka default (50 MiB / 1 MiB)", {"fetch.max.bytes": 52_428_800, "max.partition.fetch.bytes": 1_048_576}),
    ("256 KiB per partition", {"fetch.max.bytes": 52_428_800, "max.partition.fetch.bytes": 262_144}),
    ("4 MiB per partition", {"fetch.max.bytes": 52_428_800, "max.partition.fetch.bytes": 4_194_304}),
    ("16 MiB per partition", {"fetch.max.bytes": 104_857_600, "max.partition.fetch.bytes": 16_777_216}),
]


def page_messages(settings: ColstreamSettings, count: int) -> list[bytes]:
    path = settings.blob.local_root / "pages.pdf"
    path.write_bytes(_common.text_page_pdf(count, seed=11))
    session = PdfSession(path, settings.limits)
    target = render_target_for(settings.model)
    ref = DocumentRef(document_id="tuning", version=1, filename="pages.pdf", blob_uri=path.as_uri())
    out = []
    try:
        for n in range(1, count + 1):
            page = session.render(n, target)
            import base64

            task = PageTask(document=ref, page_number=n, total_pages=count, width=page.width, height=page.height,
                            image_b64=base64.b64encode(page.data).decode("ascii"))
            out.append(encode(task))
    finally:
        session.close()
    return out


def vector_messages(count: int) -> list[bytes]:
    rng = np.random.default_rng(5)
    ref = DocumentRef(document_id="tuning", version=1)
    out = []
    for n in range(1, count + 1):
        vectors = rng.standard_normal((750, 128)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        out.append(encode(PageVectors.from_array(document=ref, page_number=n, total_pages=count, model="m",
                                                 array=vectors)))
    return out


def create_topic(settings: ColstreamSettings, name: str) -> None:
    admin = admin_client(settings)  # must outlive its futures
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=3, replication_factor=1, config={"max.message.bytes": str(4 * MB)})]
    )
    for future in futures.values():
        future.result(timeout=30)


def delete_topics(settings: ColstreamSettings, names: list[str]) -> None:
    if not names:
        return
    admin = admin_client(settings)
    for future in admin.delete_topics(names, operation_timeout=30).values():
        with contextlib.suppress(Exception):
            future.result(timeout=30)


class MeasuredProducer:
    def __init__(self, settings: ColstreamSettings, overrides: dict[str, Any]) -> None:
        self.stats: dict[str, Any] = {}
        conf = {**settings.kafka.producer_config(), **overrides, "statistics.interval.ms": 100,
                "stats_cb": self._on_stats}
        self.producer = Producer(conf)
        self.errors: list[str] = []

    def _on_stats(self, raw: str) -> None:
        self.stats = json.loads(raw)

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.errors.append(str(err))

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(topic, key=key, value=value, on_delivery=self._delivered)
                return
            except BufferError:
                self.producer.poll(0.05)

    def flush(self) -> None:
        while self.producer.flush(10) > 0:
            pass
        assert not self.errors, self.errors[:3]

    def wire_bytes(self) -> int:
        # One more statistics tick after the flush so the counters include the last request.
        time.sleep(0.15)
        self.producer.poll(0)
        return sum(int(b.get("txbytes", 0)) for b in self.stats.get("brokers", {}).values())


def produce_stream(settings: ColstreamSettings, overrides: dict[str, Any], *, topic: str,
                   messages: list[bytes]) -> dict[str, float]:
    producer = MeasuredProducer(settings, overrides)
    producer.send(topic, b"warm", messages[0])  # connection, metadata, producer id
    producer.flush()
    before = producer.wire_bytes()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for n, value in enumerate(messages):
        producer.send(topic, f"doc-{n % 16}".encode(), value)
        producer.producer.poll(0)
    producer.flush()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    wire = producer.wire_bytes() - before
    payload = sum(len(m) for m in messages)
    return {"mb_per_s": payload / MB / wall, "cpu_s_per_100mb": cpu / (payload / MB) * 100,
            "wire_ratio": wire / payload}


def produce_stage_batches(settings: ColstreamSettings, overrides: dict[str, Any], *, topic: str,
                          messages: list[bytes]) -> list[float]:
    producer = MeasuredProducer(settings, overrides)
    producer.send(topic, b"warm", messages[0])
    producer.flush()
    times = []
    for start in range(0, len(messages) - STAGE_BATCH + 1, STAGE_BATCH):
        t0 = time.perf_counter()
        for n, value in enumerate(messages[start : start + STAGE_BATCH]):
            producer.send(topic, f"doc-{(start + n) % 16}".encode(), value)
        producer.flush()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def consume_all(settings: ColstreamSettings, overrides: dict[str, Any], topic: str, expected: int) -> float:
    conf = {**settings.kafka.consumer_config(f"tuning-{uuid.uuid4().hex[:6]}"), **overrides}
    consumer = Consumer(conf)
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(3)])
        got = size = 0
        t0 = time.perf_counter()
        deadline = time.monotonic() + 120
        while got < expected and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=64, timeout=0.5):
                if message.error() is None:
                    got += 1
                    size += len(message.value() or b"")
        elapsed = time.perf_counter() - t0
        assert got >= expected, f"consumed {got} of {expected}"
        return size / MB / elapsed
    finally:
        consumer.close()


def rounds(repeats: int, configs: list[tuple[str, dict[str, Any]]],
           run: Callable[[dict[str, Any]], Any]) -> dict[str, list[Any]]:
    results: dict[str, list[Any]] = {label: [] for label, _ in configs}
    for _ in range(repeats):
        for label, overrides in configs:
            results[label].append(run(overrides))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer messages and rounds (~2 min)")
    args = parser.parse_args()
    count, repeats = (96, 2) if args.quick else (240, 3)

    settings = _common.bench_settings("tuning", _common.bootstrap_servers(), create_topics=False)
    kinds = {"page": page_messages(settings, count), "vectors": vector_messages(count)}
    for kind, messages in kinds.items():
        log(f"{kind} messages: {len(messages)} x {statistics.mean(len(m) for m in messages) / 1024:.0f} KiB")
    topics: list[str] = []

    def fresh_topic() -> str:
        name = f"bench.tuning.{uuid.uuid4().hex[:8]}"
        create_topic(settings, name)
        topics.append(name)
        return name

    report = Report("kafka_tuning", "python bench/kafka_tuning.py" + (" --quick" if args.quick else ""))
    details: dict[str, Any] = {"messages": count, "repeats": repeats, "producer": {}, "consumer": {}}
    try:
        for kind, messages in kinds.items():
            topic = fresh_topic()
            stream = rounds(repeats, PRODUCER_CONFIGS,
                            partial(produce_stream, settings, topic=topic, messages=messages))
            stage = rounds(repeats, PRODUCER_CONFIGS,
                           partial(produce_stage_batches, settings, topic=topic, messages=messages))
            base_label = PRODUCER_CONFIGS[0][0]
            base = statistics.median(r["mb_per_s"] for r in stream[base_label])
            base_batch = statistics.median(t for run in stage[base_label] for t in run)
            details["producer"][kind] = {}
            for label, _ in PRODUCER_CONFIGS:
                mbps = statistics.median(r["mb_per_s"] for r in stream[label])
                cpu = statistics.median(r["cpu_s_per_100mb"] for r in stream[label])
                wire = statistics.median(r["wire_ratio"] for r in stream[label])
                batch_times = [t for run in stage[label] for t in run]
                batch_ms, worst_ms = statistics.median(batch_times), max(batch_times)
                details["producer"][kind][label] = {"mb_per_s": mbps, "cpu_s_per_100mb": cpu, "wire_ratio": wire,
                                                    "stage_batch_ms_median": batch_ms, "stage_batch_ms_max": worst_ms}
                log(f"{kind:7s} {label:38s} {mbps:6.1f} MB/s  cpu {cpu:5.2f} s/100MB  wire {wire:5.3f}  "
                    f"batch of {STAGE_BATCH}: {batch_ms:6.1f} ms (worst {worst_ms:.0f})")
                report.add(Row(f"{kind} producer: {label}", mbps, "MB/s", base, base_label, "", None,
                               f"wire/payload {wire:.3f}, CPU {cpu:.2f} s/100 MB, batch of {STAGE_BATCH} acked in "
                               f"{batch_ms:.1f} ms (x{batch_ms / base_batch:.2f} of default; worst {worst_ms:.0f} ms)"))

        topic = fresh_topic()
        producer = MeasuredProducer(settings, {})
        for n, value in enumerate(kinds["page"] * 2):
            producer.send(topic, f"doc-{n % 16}".encode(), value)
        producer.flush()
        expected = 2 * count
        consumed = rounds(repeats, CONSUMER_CONFIGS, lambda o: consume_all(settings, o, topic, expected))
        base_label = CONSUMER_CONFIGS[0][0]
        base = statistics.median(consumed[base_label])
        for label, overrides in CONSUMER_CONFIGS:
            mbps = statistics.median(consumed[label])
            details["consumer"][label] = {"mb_per_s": mbps, "runs": consumed[label], **overrides}
            log(f"consumer {label:38s} {mbps:6.1f} MB/s (runs {', '.join(f'{v:.0f}' for v in consumed[label])})")
            report.add(Row(f"page consumer: {label}", mbps, "MB/s", base, base_label, "", None, ""))
    finally:
        delete_topics(settings, topics)

    shipped = settings.kafka
    details["shipped_defaults"] = {"linger_ms": shipped.linger_ms, "batch_size": shipped.batch_size,
                                   "compression_type": shipped.compression_type,
                                   "fetch_max_bytes": shipped.fetch_max_bytes,
                                   "max_partition_fetch_bytes": shipped.max_partition_fetch_bytes}
    log(f"shipped KafkaSettings defaults: {details['shipped_defaults']}")
    report.details = details
    report.print_and_save()


if __name__ == "__main__":
    main()
