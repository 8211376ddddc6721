"""A runner's figures reach ``/metrics``: parsed with prometheus_client's parser, the
counters move as records flow, dead letters are counted by error type, and emitted
records (pages a splitter produces while it renders) count as produced."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import Future

from prometheus_client.parser import text_string_to_metric_families

from colstream.infra.health import HealthRegistry, serve_health
from colstream.infra.kafka import OutRecord
from colstream.infra.settings import ColstreamSettings
from colstream.infra.stage_runner import Emit, RawRecord, StageRunner
from colstream.testing import InMemoryBroker

DLQ = ColstreamSettings().topics.dlq


class EchoAndReject:
    """Emits one record per input while it works, returns one more, and dead-letters 'bad-*' keys."""

    name = "metered"

    def submit(self, records: Sequence[RawRecord], emit: Emit) -> Future[list[OutRecord]]:
        out: list[OutRecord] = []
        for r in records:
            if (r.key or "").startswith("bad-"):
                out.append(OutRecord(DLQ, r.key, json.dumps({"error_type": "EncryptedDocument"}).encode()))
            else:
                emit(OutRecord("out", r.key, b"page"))
                out.append(OutRecord("out", r.key, b"done"))
        future: Future[list[OutRecord]] = Future()
        future.set_result(out)
        return future

    def close(self) -> None:
        pass


def _samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_as_records_flow() -> None:
    broker = InMemoryBroker()
    broker.create_topic("in")
    for i in range(5):
        broker.append("in", f"doc-{i}", b"x")
    broker.append("in", "bad-1", b"x")
    settings = ColstreamSettings().updated(kafka={"bootstrap_servers": "in-memory:0"},
                                           metrics={"kafka_statistics_interval_ms": 0})
    server = serve_health("127.0.0.1", 0, HealthRegistry())
    before = _samples(server.port)
    runner = StageRunner(settings, EchoAndReject(), topics=["in"], group_id="g", batch_size=4,
                         consumer_factory=broker.consumer, producer_factory=broker.producer)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while broker.committed_offset("g", "in") != 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        after = _samples(server.port)
    finally:
        runner.request_stop()
        thread.join(10)
        server.stop()

    def moved(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert moved("colstream_records_consumed_total", stage="metered") == 6
    # 5 emitted while working + 5 returned + 1 dead letter
    assert moved("colstream_records_produced_total", stage="metered") == 11
    assert moved("colstream_dead_letters_total", stage="metered", error_type="EncryptedDocument") == 1
    assert moved("colstream_batch_size_count", stage="metered") >= 2
    assert moved("colstream_batch_size_sum", stage="metered") == 6
    assert moved("colstream_batch_seconds_count", stage="metered") >= 2
    assert _value(after, "colstream_documents_in_flight", stage="metered") == 0
    assert runner.stats.records_out == 11
