"""The stage runner on the in-memory broker: order, pause/resume, rebalance, commits,
backpressure and the shutdown bound, in-process and in seconds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError

from colstream.infra.kafka import OutRecord
from colstream.infra.settings import ColstreamSettings
from colstream.infra.stage_runner import Backpressure, BatchAbandoned, Emit, RawRecord, StageRunner
from colstream.testing import FakeConsumer, InMemoryBroker, RunningStage

IN, OUT, GROUP = "in", "out", "g"


class ScriptedHandler:
    """Echoes every record to OUT; per offset it can wait on a gate, sleep, or refuse
    with Backpressure a number of times."""

    name = "scripted"

    def __init__(self, workers: int = 4) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self.gates: dict[int, threading.Event] = {}
        self.delays: dict[int, float] = {}
        self.refusals: dict[int, int] = {}
        self.attempts: list[int] = []
        self.emit_failures: list[BaseException] = []
        self.emit_while_working = False

    def submit(self, records: Sequence[RawRecord], emit: Emit) -> Future[list[OutRecord]]:
        return self._pool.submit(self._work, list(records), emit)

    def _work(self, records: list[RawRecord], emit: Emit) -> list[OutRecord]:
        out = []
        for r in records:
            offset = r.position.offset
            self.attempts.append(offset)
            if offset in self.gates:
                self.gates[offset].wait(10)
                if self.emit_while_working:
                    try:
                        emit(OutRecord(OUT, r.key, b"late"))
                    except BatchAbandoned as exc:
                        self.emit_failures.append(exc)
                        raise
            time.sleep(self.delays.get(offset, 0.0))
            if self.refusals.get(offset, 0) > 0:
                self.refusals[offset] -= 1
                raise Backpressure("store is down", retry_after_s=0.05)
            out.append(OutRecord(OUT, r.key, r.value))
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@pytest.fixture
def broker() -> InMemoryBroker:
    b = InMemoryBroker()
    b.create_topic(IN)
    b.create_topic(OUT)
    return b


@pytest.fixture
def settings(tmp_path: Path) -> ColstreamSettings:
    return ColstreamSettings().updated(kafka={"bootstrap_servers": "in-memory"}, state_dir=tmp_path,
                                       shutdown={"grace_s": 5.0})


def make_runner(
    settings: ColstreamSettings, broker: InMemoryBroker, handler: ScriptedHandler, **options: object
) -> tuple[StageRunner, list[FakeConsumer]]:
    consumers: list[FakeConsumer] = []

    def consumer_factory(config: dict[str, object]) -> FakeConsumer:
        consumer = broker.consumer(config)
        consumers.append(consumer)
        return consumer

    defaults: dict[str, object] = {"batch_size": 4, "batch_timeout_ms": 10, "max_in_flight": 1}
    runner = StageRunner(settings, handler, topics=[IN], group_id=GROUP,
                         consumer_factory=consumer_factory, producer_factory=broker.producer,
                         **{**defaults, **options})  # type: ignore[arg-type]
    return runner, consumers


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


@pytest.fixture
def started() -> Iterator[list[RunningStage]]:
    runs: list[RunningStage] = []
    yield runs
    for run in runs:
        if run.thread.is_alive():
            run.stop()


def publish(broker: InMemoryBroker, n: int) -> None:
    for i in range(n):
        broker.append(IN, f"k{i}", f"v{i}")


def test_outputs_keep_input_order_when_later_batches_finish_first(
    settings: ColstreamSettings, broker: InMemoryBroker, started: list[RunningStage]
) -> None:
    handler = ScriptedHandler()
    handler.delays = {0: 0.3, 1: 0.2, 2: 0.1}
    runner, _ = make_runner(settings, broker, handler, batch_size=1, max_in_flight=3)
    publish(broker, 6)
    started.append(run := RunningStage(runner))
    wait_until(lambda: broker.committed_offset(GROUP, IN) == 6)
    run.stop()
    assert broker.values(OUT) == [f"v{i}".encode() for i in range(6)]
    assert run.error is None


def test_a_batch_is_committed_only_after_its_outputs_are_acknowledged(
    settings: ColstreamSettings, broker: InMemoryBroker, started: list[RunningStage]
) -> None:
    broker.hold_acks = True
    runner, _ = make_runner(settings, broker, ScriptedHandler())
    publish(broker, 3)
    started.append(run := RunningStage(runner))
    wait_until(lambda: runner.stats.records_out == 3)
    time.sleep(0.2)
    assert broker.committed_offset(GROUP, IN) is None and broker.values(OUT) == []
    broker.hold_acks = False
    wait_until(lambda: broker.committed_offset(GROUP, IN) == 3)
    assert len(broker.values(OUT)) == 3
    run.stop()


def test_partitions_pause_with_batches_piling_up_and_resume_once_drained(
    settings: ColstreamSettings, broker: InMemoryBroker, started: list[RunningStage]
) -> None:
    handler = ScriptedHandler()
    handler.gates[0] = threading.Event()
    runner, consumers = make_runner(settings, broker, handler, batch_size=1)
    publish(broker, 8)
    started.append(run := RunningStage(runner))
    wait_until(lambda: bool(consumers) and bool(consumers[0].paused))
    consumer = consumers[0]
    resumes_at_pause = consumer.resume_calls  # the assignment states "not paused" once
    time.sleep(0.3)
    # Paused once and kept paused while the handler is stuck (no pause/resume per poll).
    assert consumer.pause_calls == 1 and consumer.resume_calls == resumes_at_pause and consumer.paused
    assert len(runner._ready) == 3  # the high-water mark, then nothing more is fetched
    handler.gates[0].set()
    wait_until(lambda: broker.committed_offset(GROUP, IN) == 8)
    assert not consumer.paused and consumer.resume_calls > resumes_at_pause
    assert broker.values(OUT) == [f"v{i}".encode() for i in range(8)]
    run.stop()


def test_revoke_mid_batch_finishes_and_commits_before_the_partitions_go(
    settings: ColstreamSettings, broker: InMemoryBroker, started: list[RunningStage]
) -> None:
    handler = ScriptedHandler()
    handler.gates[0] = threading.Event()
    runner, consumers = make_runner(settings, broker, handler)
    publish(broker, 2)
    started.append(run := RunningStage(runner))
    wait_until(lambda: 0 in handler.attempts)
    consumers[0].request_rebalance()
    threading.Timer(0.3, handler.gates[0].set).start()
    wait_until(lambda: broker.committed_offset(GROUP, IN) == 2)
    run.stop()
    # The revoke waited for the batch and committed it synchronously; nothing was redone.
    assert any(not asynchronous for _, _, asynchronous in broker.commit_log)
    assert sorted(handler.attempts) == [0, 1]
    assert broker.values(OUT) == [b"v0", b"v1"]
    assert run.error is None


def test_a_failed_commit_is_retried(
    settings: ColstreamSettings, broker: InMemoryBroker, started: list[RunningStage]
) -> None:
    broker.commit_errors = [KafkaError(KafkaError._TRANSPORT, "broker away", retriable=True)] * 2
    runner, _ = make_runner(settings, broker, ScriptedHandler())
    publish(broker, 2)
    started.append(run := RunningStage(runner))
    wait_until(lambda: broker.committed_offset(GROUP, IN) == 2)
    assert broker.commit_errors == []
    run.stop()
    assert run.error is None


def test_backpressure_pauses_rewinds_to_the_batch_and_retries_it(
    settings: ColstreamSettings, broker: InMemoryBroker, started: list[RunningStage]
) -> None:
    handler = ScriptedHandler()
    handler.refusals = {1: 2}  # the store refuses the batch holding offset 1 twice
    runner, consumers = make_runner(settings, broker, handler, batch_size=2)
    publish(broker, 4)
    started.append(run := RunningStage(runner))
    wait_until(lambda: broker.committed_offset(GROUP, IN) == 4)
    run.stop()
    assert runner.backpressure_events == 2
    assert (IN, 0, 0) in consumers[0].seeks  # back to the first uncommitted offset
    # Every record reached the output exactly once, in order: the refused attempts produced nothing.
    assert broker.values(OUT) == [b"v0", b"v1", b"v2", b"v3"]
    assert handler.attempts.count(0) == 3
    assert run.error is None


def test_refused_deliveries_are_answered_with_a_retry_not_a_commit(
    settings: ColstreamSettings, broker: InMemoryBroker, started: list[RunningStage]
) -> None:
    broker.refuse_deliveries = 1
    runner, _ = make_runner(settings, broker, ScriptedHandler())
    publish(broker, 2)
    started.append(run := RunningStage(runner))
    wait_until(lambda: broker.committed_offset(GROUP, IN) == 2)
    run.stop()
    assert runner.backpressure_events == 1
    # At least once: the batch is redone whole, so the record that did land may land twice.
    assert set(broker.values(OUT)) == {b"v0", b"v1"}


def test_shutdown_does_not_wait_for_a_batch_past_the_grace(
    settings: ColstreamSettings, broker: InMemoryBroker, started: list[RunningStage]
) -> None:
    handler = ScriptedHandler()
    handler.gates[1] = threading.Event()  # never opened: a batch stuck for good
    handler.emit_while_working = True
    runner, _ = make_runner(settings.updated(shutdown={"grace_s": 0.5}), broker, handler, batch_size=1)
    publish(broker, 2)
    started.append(run := RunningStage(runner))
    wait_until(lambda: broker.committed_offset(GROUP, IN) == 1 and 1 in handler.attempts)
    took = run.stop()
    assert took < 2.5, f"stop took {took:.1f}s with a 0.5s grace"
    assert run.error is None
    # The stuck batch stays uncommitted (replayed by the group) ...
    assert broker.committed_offset(GROUP, IN) == 1
    # ... and whatever it emits once abandoned is dropped, not produced.
    handler.gates[1].set()
    wait_until(lambda: bool(handler.emit_failures))
    assert broker.values(OUT) == [b"v0"]


class RevokeRecordingConsumer(FakeConsumer):
    """Keeps whatever the runner's revoke callback raised: librdkafka would raise it from
    poll() or close() in the middle of a rebalance."""

    def __init__(self, broker: InMemoryBroker, group_id: str, before_revoke: Callable[[], None] = lambda: None) -> None:
        super().__init__(broker, group_id)
        self.revoke_errors: list[BaseException] = []
        self.revokes = 0
        self.before_revoke = before_revoke

    def subscribe(self, topics: list[str], on_assign: Any = None, on_revoke: Any = None, on_lost: Any = None) -> None:
        def recorded(consumer: Any, partitions: Any) -> None:
            self.revokes += 1
            self.before_revoke()
            try:
                on_revoke(consumer, partitions)
            except BaseException as exc:
                self.revoke_errors.append(exc)
                raise

        super().subscribe(topics, on_assign=on_assign, on_revoke=recorded, on_lost=on_lost)


def test_shutdown_cancels_queued_batches_and_its_revoke_raises_nothing(
    settings: ColstreamSettings, broker: InMemoryBroker, started: list[RunningStage]
) -> None:
    handler = ScriptedHandler(workers=1)
    handler.gates[0] = threading.Event()  # batch 0 holds the only worker; batches 1 and 2 queue behind it
    consumers: list[RevokeRecordingConsumer] = []

    def consumer_factory(config: dict[str, object]) -> RevokeRecordingConsumer:
        consumers.append(RevokeRecordingConsumer(broker, str(config["group.id"])))
        return consumers[-1]

    runner = StageRunner(settings.updated(shutdown={"grace_s": 0.3}), handler, topics=[IN], group_id=GROUP,
                         batch_size=1, batch_timeout_ms=10, max_in_flight=3, consumer_factory=consumer_factory,
                         producer_factory=broker.producer)
    publish(broker, 3)
    started.append(run := RunningStage(runner))
    wait_until(lambda: 0 in handler.attempts and runner.stats.batches == 3)
    run.stop()
    handler.gates[0].set()
    time.sleep(0.1)
    assert run.error is None
    consumer = consumers[0]
    assert consumer.revokes == 1 and consumer.revoke_errors == [] and consumer.closed
    # The queued batches were cancelled, not run after the stage let go of them; nothing was committed.
    assert handler.attempts == [0]
    assert broker.committed_offset(GROUP, IN) is None and broker.values(OUT) == []


def test_a_revoke_meeting_a_batch_the_handler_cancelled_raises_nothing_out_of_the_callback(
    settings: ColstreamSettings, broker: InMemoryBroker, started: list[RunningStage]
) -> None:
    handler = ScriptedHandler(workers=1)
    handler.gates[0] = threading.Event()
    consumers: list[RevokeRecordingConsumer] = []

    def cancel_queued() -> None:
        # The handler drops its queue (an executor shut down with cancel_futures) as the rebalance starts.
        handler._pool.shutdown(wait=False, cancel_futures=True)
        handler.gates[0].set()

    def consumer_factory(config: dict[str, object]) -> RevokeRecordingConsumer:
        consumers.append(RevokeRecordingConsumer(broker, str(config["group.id"]), before_revoke=cancel_queued))
        return consumers[-1]

    runner = StageRunner(settings, handler, topics=[IN], group_id=GROUP, batch_size=1, batch_timeout_ms=10,
                         max_in_flight=2, consumer_factory=consumer_factory, producer_factory=broker.producer)
    publish(broker, 2)
    started.append(run := RunningStage(runner))
    wait_until(lambda: 0 in handler.attempts and runner.stats.batches == 2)
    consumers[0].request_rebalance()
    run.thread.join(10)
    assert not run.thread.is_alive()
    assert consumers[0].revoke_errors == []  # nothing escaped into the rebalance
    # A handler that drops its work is a bug: it stops the stage from the poll loop, not from
    # inside the rebalance, and nothing past the finished batch is committed.
    assert run.error is not None
    assert broker.committed_offset(GROUP, IN) in (None, 1)
