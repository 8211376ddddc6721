"""librdkafka's repeated errors fold into one line per interval with a count."""

from __future__ import annotations

import logging
import time

import pytest
from confluent_kafka import Producer

from colstream.infra.kafka_logs import RateLimitedKafkaLog, kafka_log_config
from colstream.infra.settings import ColstreamSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test.kafka"]


def test_a_flood_of_identical_errors_is_one_line_per_interval_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="test.kafka")
    clock = Clock()
    limiter = RateLimitedKafkaLog(logging.getLogger("test.kafka"), interval_s=30.0, clock=clock)
    # 5,551 lines in 85 s, as a broker outage wrote them; the timings in each line differ.
    for n in range(5551):
        clock.now = 1000.0 + n * 85 / 5551
        limiter.log(3, "%s [%s] %s", "FAIL", "rdkafka#producer-1",
                    f"127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed: Connection refused "
                    f"(after {n % 7}ms in state CONNECT)")
    limiter.flush()
    out = lines(caplog)
    assert 3 <= len(out) <= 5, out
    assert "repeated" not in out[0]
    counted = sum(int(line.split("(repeated ")[1].split(" ")[0]) for line in out[1:])
    assert counted == 5551 - 1
    assert all("Connection refused" in line for line in out)


def test_different_errors_are_never_hidden_behind_each_other(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="test.kafka")
    clock = Clock()
    limiter = RateLimitedKafkaLog(logging.getLogger("test.kafka"), interval_s=30.0, clock=clock)
    for _ in range(100):
        limiter.log(3, "%s [%s] %s", "FAIL", "p", "Connection refused")
        limiter.log(4, "%s [%s] %s", "SASL", "p", "Authentication failed")
    out = lines(caplog)
    assert len(out) == 2 and "Connection refused" in out[0] and "Authentication failed" in out[1]
    clock.now += 31
    limiter.log(3, "%s [%s] %s", "FAIL", "p", "Connection refused")
    assert lines(caplog)[-1].endswith("(repeated 100 times in 31s)")


def test_every_client_config_carries_the_limiter() -> None:
    settings = ColstreamSettings().updated(kafka={"bootstrap_servers": "127.0.0.1:1"})
    for config in (settings.kafka.common_config(), settings.kafka.producer_config(),
                   settings.kafka.consumer_config("g")):
        assert callable(config["error_cb"]) and hasattr(config["logger"], "log")
    # a client that sets its own callback keeps it
    own = kafka_log_config({"error_cb": print})
    assert own["error_cb"] is print


@pytest.mark.slow  # real clients reconnecting for 3 s
def test_real_clients_against_closed_ports_log_a_handful_of_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="test.kafka")
    limiter = RateLimitedKafkaLog(logging.getLogger("test.kafka"), interval_s=60.0)
    # Three clients, eight unreachable brokers, reconnecting every 10-20 ms: without the limiter
    # this writes a couple of dozen lines in 3 s, each a near-copy of the last.
    config = kafka_log_config({"bootstrap.servers": ",".join(f"127.0.0.1:{port}" for port in range(1, 9)),
                               "reconnect.backoff.ms": 10, "reconnect.backoff.max.ms": 20,
                               "log.connection.close": True})
    config.update(error_cb=limiter.error_cb, logger=limiter)
    producers = [Producer(config) for _ in range(3)]
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        for producer in producers:
            producer.poll(0.03)
    calls = len(lines(caplog))
    limiter.flush()
    out = lines(caplog)
    assert any("refused" in line.lower() or "down" in line.lower() for line in out), out
    assert calls <= 4, out
    assert any("repeated" in line for line in out[calls:]), out


def test_a_stage_reports_a_repeated_consumer_error_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    from confluent_kafka import KafkaError

    from colstream.infra.kafka_logs import process_kafka_log
    from colstream.infra.stage_runner import StageRunner

    caplog.set_level(logging.ERROR, logger="colstream.kafka")
    process_kafka_log().flush()
    caplog.clear()
    error = KafkaError(KafkaError._AUTHENTICATION, "SASL authentication error: Authentication failed", fatal=False)
    message = SimpleNamespace(error=lambda: error)
    runner = SimpleNamespace(handler=SimpleNamespace(name="sink"), health=SimpleNamespace(connected=lambda _: None))
    for _ in range(500):
        assert StageRunner._to_record(runner, message) is None  # type: ignore[arg-type]
    out = [r.getMessage() for r in caplog.records if "consumer error" in r.getMessage()]
    assert len(out) == 1 and "Authentication failed" in out[0]
    process_kafka_log().flush()
    assert "(repeated 499 times" in caplog.records[-1].getMessage()
