"""Stage health: live fails on a stalled poll loop or an overlong batch; ready needs partitions
and a broker; the HTTP server answers /livez, /readyz and /metrics."""

from __future__ import annotations

import json

import httpx
import pytest

from colstream.infra.health import HealthRegistry, StageHealth, serve_health
from colstream.infra.settings import HealthSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_live_fails_when_the_poll_loop_stalls_or_a_batch_overruns() -> None:
    clock = Clock()
    health = StageHealth("splitter", HealthSettings(poll_stall_s=10, max_batch_s=60), clock=clock)
    assert health.live() == (True, "ok")
    health.poll_turned()
    clock.now += 11
    live, reason = health.live()
    assert not live and "poll loop" in reason
    health.poll_turned()
    health.batch_started(1)
    clock.now += 5
    health.poll_turned()
    assert health.live()[0]
    clock.now += 56
    health.poll_turned()
    live, reason = health.live()
    assert not live and "batch" in reason
    health.batch_finished(1)
    assert health.live()[0]


def test_ready_needs_partitions_and_a_connected_broker() -> None:
    health = StageHealth("sink")
    assert health.ready() == (False, "not connected to the broker")
    health.on_kafka_statistics(json.dumps({"brokers": {"b1": {"nodeid": 1, "state": "UP"}}}))
    assert health.ready() == (False, "no partitions assigned")
    health.assigned(3)
    assert health.ready() == (True, "ok")
    health.on_kafka_statistics(json.dumps({"brokers": {"b1": {"nodeid": 1, "state": "DOWN"}}}))
    assert not health.ready()[0]
    health.connected(True)
    health.stopped()
    assert health.ready() == (False, "stopping")


def test_server_answers_the_probes_and_metrics() -> None:
    from colstream.infra.metrics import StageMetrics

    StageMetrics("embedder").records_consumed(0)  # a stage's series exist once it reports
    registry = HealthRegistry()
    health = registry.register(StageHealth("embedder"))
    server = serve_health("127.0.0.1", 0, registry)
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert httpx.get(f"{base}/livez").status_code == 200
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 503
        assert ready.json()["stages"]["embedder"]["ready_reason"] == "not connected to the broker"
        health.connected(True)
        health.assigned(1)
        assert httpx.get(f"{base}/readyz").status_code == 200
        metrics = httpx.get(f"{base}/metrics")
        assert metrics.status_code == 200 and "colstream_records_consumed" in metrics.text
        assert httpx.get(f"{base}/nope").status_code == 404
    finally:
        server.stop()


def test_background_checks_answer_at_once_when_a_dependency_hangs() -> None:
    import threading
    import time as _time

    from colstream.infra.health import BackgroundChecks
    from colstream.infra.settings import HealthSettings

    hang = threading.Event()
    calls = {"kafka": 0}

    def kafka() -> bool:
        calls["kafka"] += 1
        hang.wait(30)
        return True

    checks = BackgroundChecks({"kafka": kafka, "qdrant": lambda: True}, HealthSettings(check_timeout_s=0.3))
    started = _time.monotonic()
    results = checks.refresh(0.1)
    assert _time.monotonic() - started < 1.0
    assert results["qdrant"].ok is True
    assert results["kafka"].ok is None  # not answered yet, not claimed either way
    _time.sleep(0.35)
    results = checks.refresh(0.5)
    assert results["kafka"].ok is False and "no answer for" in results["kafka"].detail
    assert calls["kafka"] == 1  # a hung probe holds one thread: it is not started again
    hang.set()
    _time.sleep(0.1)
    results = checks.refresh(0.5)
    assert results["kafka"].ok is True
    report = checks.report()
    assert report["kafka"]["ok"] is True and report["kafka"]["age_s"] is not None


def test_a_taken_port_is_one_clear_error_and_port_zero_picks_a_free_one() -> None:
    import socket

    from colstream.infra.health import HealthPortInUse

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(HealthPortInUse, match=f"port {port} on 127.0.0.1 is in use.*COLSTREAM_METRICS__PORT"):
            serve_health("127.0.0.1", port)
    first, second = serve_health("127.0.0.1", 0), serve_health("127.0.0.1", 0)
    try:
        assert first.port != second.port and 0 not in (first.port, second.port)
    finally:
        first.stop()
        second.stop()
