"""Stage metrics: names and labels as the dashboards query them, lag from librdkafka statistics,
pages pending from the consumer groups' lag."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from colstream.infra.metrics import (
    PagesPendingProbe,
    StageMetrics,
    lags_from_statistics,
    pages_pending,
    render_latest,
)
from colstream.infra.settings import ColstreamSettings


def scrape() -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(render_latest().decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(name: str, **labels: str) -> float:
    return scrape().get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def test_stage_counters_move_and_parse_with_the_stage_label() -> None:
    metrics = StageMetrics("unit-a")
    before = value("colstream_records_consumed_total", stage="unit-a")
    metrics.records_consumed(3)
    metrics.records_produced(5)
    metrics.dead_letter("BlobNotFound")
    metrics.batch_done(3, 0.2)
    metrics.pages_indexed(2)
    metrics.embed_forward(0.5)
    metrics.sink_write(0.1)
    metrics.documents_in_flight(1)
    assert value("colstream_records_consumed_total", stage="unit-a") == before + 3
    assert value("colstream_records_produced_total", stage="unit-a") == 5
    assert value("colstream_dead_letters_total", stage="unit-a", error_type="BlobNotFound") == 1
    assert value("colstream_batch_size_count", stage="unit-a") == 1
    assert value("colstream_batch_seconds_sum", stage="unit-a") == 0.2
    assert value("colstream_pages_indexed_total", stage="unit-a") == 2
    assert value("colstream_embed_forward_seconds_count", stage="unit-a") == 1
    assert value("colstream_sink_write_seconds_count", stage="unit-a") == 1
    assert value("colstream_documents_in_flight", stage="unit-a") == 1
    assert "colstream_gpu_memory_bytes" in {f.name for f in text_string_to_metric_families(render_latest().decode())}


def test_consumer_lag_comes_from_statistics_and_drops_revoked_partitions() -> None:
    stats = {"topics": {"documents.pages": {"partitions": {
        "0": {"fetch_state": "active", "consumer_lag": 7},
        "1": {"fetch_state": "active", "consumer_lag": -1},
        "2": {"fetch_state": "none", "consumer_lag": 4},
        "-1": {"fetch_state": "none", "consumer_lag": 9},
    }}}}
    assert lags_from_statistics(json.dumps(stats)) == {("documents.pages", 0): 7}
    assert lags_from_statistics("not json") == {}
    metrics = StageMetrics("unit-lag")
    metrics.on_kafka_statistics(json.dumps(stats))
    assert value("colstream_consumer_lag", stage="unit-lag", topic="documents.pages", partition="0") == 7
    metrics.consumer_lag({("documents.pages", 1): 2})
    series = scrape()["colstream_consumer_lag"]
    assert (("partition", "0"), ("stage", "unit-lag"), ("topic", "documents.pages")) not in series
    assert series[(("partition", "1"), ("stage", "unit-lag"), ("topic", "documents.pages"))] == 2


def test_pages_pending_is_the_embedder_lag_on_pages_plus_the_sink_lag_on_vectors() -> None:
    settings = ColstreamSettings().updated(consumer_group_prefix="p-")
    lags = {("p-embedder", settings.topics.pages): 10, ("p-sink", settings.topics.vectors): 4}
    assert pages_pending(settings, lambda group, topic: lags[(group, topic)]) == 14

    probe = PagesPendingProbe(settings, "unit-pending", lag=lambda group, topic: lags[(group, topic)])
    assert probe.refresh() == 14
    assert value("colstream_pages_pending", stage="unit-pending") == 14

    def broken(group: str, topic: str) -> int:
        raise RuntimeError("broker down")

    failing = PagesPendingProbe(settings, "unit-pending", lag=broken)
    assert failing.refresh() is None
    assert value("colstream_pages_pending", stage="unit-pending") == 14  # the last good value stays
