"""The poll loop every stage shares: batch, hand off, produce, then commit.

A stage is a :class:`StageHandler`: a pure-ish core behind ``submit``. The runner
owns the Kafka side, so the handlers never see a consumer:

* records are consumed in micro-batches (up to ``batch_size`` or ``batch_timeout_ms``);
* a batch is handed to the handler, which returns a future of output records
  (it may also emit records itself while it works, e.g. pages as they render);
* when the oldest in-flight batch is done, its outputs are produced, the runner
  waits for the broker's acknowledgement, and only then commits the batch's offsets.

So delivery is at-least-once: a crash anywhere before the commit replays the
batch, and every downstream write is idempotent. While ``max_in_flight`` batches
are outstanding the runner pauses its partitions but keeps polling, which keeps
the consumer in its group however long a batch takes. Handlers do their work off
this thread; the poll loop never sleeps on a handler.

A transient outage of what a handler writes to (the store, the broker) is not the
records' fault: the handler fails the batch's future with :class:`Backpressure`.
The runner then pauses its partitions, seeks back to the first uncommitted offset
of that batch and hands it over again after a delay (the model is quix-streams'
``SinkBackpressureError``). Refused deliveries of a batch's outputs are answered
the same way.

On stop the runner gives in-flight batches ``shutdown.grace_s``, commits what is
durable and abandons the rest uncommitted: the group replays it. It never waits
for a handler past that bound: ``run()`` returns, and the process leaves even if a
handler thread is still inside a 60 s batch (see :func:`colstream.app.run_stage`).

Every runner reports to :mod:`colstream.infra.metrics` (records in and out, dead
letters by type, batch sizes and times, documents in flight, consumer lag from
librdkafka's statistics) and to :mod:`colstream.infra.health`: the poll loop's
turns, each batch from hand-over to its outputs being produced, the assignment and
the broker connection. So ``/livez`` fails on a handler stuck inside one batch even
though the loop keeps polling (and keeps the partitions) while it waits.
"""

from __future__ import annotations

import itertools
import json
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, wait
from dataclasses import dataclass, field
from typing import Protocol

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from colstream.infra.health import StageHealth, stage_health
from colstream.infra.kafka import (
    ConsumerFactory,
    ConsumerLike,
    DeliveryFailed,
    OutRecord,
    ProducerClient,
    ProducerFactory,
    RecordPosition,
    kafka_consumer,
    kafka_producer,
)
from colstream.infra.kafka_logs import process_kafka_log
from colstream.infra.logs import bind_stage
from colstream.infra.metrics import StageMetrics
from colstream.infra.settings import ColstreamSettings
from colstream.infra.stage_failures import RawRecord, dead_letter

__all__ = [
    "Backpressure",
    "BatchAbandoned",
    "Emit",
    "RawRecord",
    "RecordPosition",
    "StageHandler",
    "StageRunner",
    "dead_letter",
]

log = logging.getLogger(__name__)

Emit = Callable[[OutRecord], None]


class Backpressure(Exception):
    """A transient outage downstream: retry the batch later, do not blame its records."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class BatchAbandoned(BaseException):
    """Raised by ``emit`` in a handler still working on a batch the runner gave up on
    (shutdown past its grace, a backpressure rewind). A BaseException, so a handler's
    ``except Exception`` does not turn it into a dead letter: the batch is replayed."""


# Delay before a batch refused with Backpressure is tried again, doubling per
# consecutive refusal up to the cap; a committed batch resets it.
_BACKPRESSURE_FIRST_S = 0.5
_BACKPRESSURE_MAX_S = 30.0
_COMMIT_GIVE_UP_CODES = frozenset({
    KafkaError._NO_OFFSET, KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION,
    KafkaError.REBALANCE_IN_PROGRESS, KafkaError._ASSIGNMENT_LOST, KafkaError._STATE,
})

# Batches allowed to wait for broker acknowledgements beyond those being processed.
_MAX_AWAITING_ACKS = 4
# Consumed batches held locally before the partitions are paused, and the level at
# which they are resumed.
_READY_HIGH = 3
_READY_LOW = 1


class StageHandler(Protocol):
    name: str

    def submit(self, records: Sequence[RawRecord], emit: Emit) -> Future[list[OutRecord]]: ...

    def close(self) -> None: ...


@dataclass
class StageStats:
    batches: int = 0
    records_in: int = 0
    records_out: int = 0
    commits: int = 0
    batches_committed: int = 0
    last_commit_at: float | None = None
    started_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "batches": self.batches,
            "records_in": self.records_in,
            "records_out": self.records_out,
            "commits": self.commits,
            "batches_committed": self.batches_committed,
            "last_commit_at": self.last_commit_at,
            "uptime_s": round(time.time() - self.started_at, 1),
        }


@dataclass
class _InFlight:
    """One batch: handed to the handler, then its outputs produced, then committed."""

    records: list[RawRecord]
    batch_id: int = 0
    started: float = field(default_factory=time.perf_counter)
    future: Future[list[OutRecord]] | None = None
    produced: bool = False
    abandoned: bool = False
    unacked: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def sent(self) -> None:
        with self.lock:
            self.unacked += 1

    def acked(self, err: KafkaError | None, msg: Message) -> None:
        with self.lock:
            self.unacked -= 1
            if err is not None:
                self.errors.append(f"{msg.topic()}: {err.str()}")

    @property
    def durable(self) -> bool:
        return self.produced and self.unacked == 0

    def first_offsets(self) -> dict[tuple[str, int], int]:
        first: dict[tuple[str, int], int] = {}
        for r in self.records:
            key = (r.position.topic, r.position.partition)
            first[key] = min(first.get(key, r.position.offset), r.position.offset)
        return first


def _retriable_commit_error(exc: BaseException) -> bool:
    return isinstance(exc, KafkaException) and exc.args[0].code() not in _COMMIT_GIVE_UP_CODES


class StageRunner:
    def __init__(
        self,
        settings: ColstreamSettings,
        handler: StageHandler,
        *,
        topics: Sequence[str],
        group_id: str,
        batch_size: int = 32,
        batch_timeout_ms: int = 100,
        max_in_flight: int = 1,
        shutdown_grace_s: float | None = None,
        producer: ProducerClient | None = None,
        consumer_factory: ConsumerFactory = kafka_consumer,
        producer_factory: ProducerFactory = kafka_producer,
    ) -> None:
        self.settings = settings
        self.handler = handler
        self.topics = list(topics)
        self.group_id = group_id
        self.batch_size = batch_size
        self.batch_timeout_s = batch_timeout_ms / 1000
        self.max_in_flight = max_in_flight
        self.shutdown_grace_s = settings.shutdown.grace_s if shutdown_grace_s is None else shutdown_grace_s
        self.producer = producer or ProducerClient(settings, factory=producer_factory)
        self.consumer_factory = consumer_factory
        self.stats = StageStats()
        self._stop = threading.Event()
        self._stopping = False
        self._in_flight: deque[_InFlight] = deque()
        self._consumer: ConsumerLike | None = None
        self._paused = False
        self._last_committed: dict[tuple[str, int], TopicPartition] = {}
        # Consumed but not yet handed to the handler (at most about one batch).
        self._ready: deque[list[RawRecord]] = deque()
        self.assigned: set[tuple[str, int]] = set()
        # Backpressure: no batch is handed over before this (monotonic) time.
        self._backoff_until = 0.0
        self._refusals = 0
        self.backpressure_events = 0
        # A handler bug seen inside a rebalance callback, raised from the poll loop.
        self._failure: BaseException | None = None
        self.metrics = StageMetrics(handler.name)
        self.health: StageHealth = stage_health(handler.name, settings.health)
        self._batch_ids = itertools.count(1)

    # -- lifecycle -----------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.request_stop())

    def consumer_config(self) -> dict[str, object]:
        """The group's consumer configuration, with librdkafka's statistics feeding the lag
        gauge and the connection state, and its errors feeding readiness."""
        config: dict[str, object] = dict(self.settings.kafka.consumer_config(self.group_id))
        earlier_error_cb = config.get("error_cb")

        def error_cb(error: KafkaError) -> None:
            self.health.on_kafka_error(error)
            if callable(earlier_error_cb):
                earlier_error_cb(error)

        def stats_cb(stats_json: str) -> None:
            self.metrics.on_kafka_statistics(stats_json)
            self.health.on_kafka_statistics(stats_json)

        config["error_cb"] = error_cb
        interval = self.settings.metrics.kafka_statistics_interval_ms
        if interval > 0:
            config["statistics.interval.ms"] = interval
            config["stats_cb"] = stats_cb
        return config

    def run(self) -> None:
        bind_stage(self.handler.name)
        consumer = self.consumer_factory(self.consumer_config())
        self._consumer = consumer
        consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                           on_lost=self._on_lost)
        log.info("%s: consuming %s as group %s", self.handler.name, self.topics, self.group_id)
        deadline: float | None = None
        try:
            while not self._stop.is_set():
                self.health.poll_turned()
                self._step(consumer)
                if self._failure is not None:
                    raise self._failure
            deadline = time.monotonic() + self.shutdown_grace_s
            log.info("%s: stopping; draining in-flight work for at most %.0fs", self.handler.name,
                     self.shutdown_grace_s)
            self.health.stopped()
            self._shutdown(consumer, deadline)
        finally:
            self._stopping = True
            self.health.stopped()
            try:
                consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log.warning("%s: consumer close: %s", self.handler.name, exc)
            self._close_handler(deadline)

    def _close_handler(self, deadline: float | None) -> None:
        """Close the handler, but never wait for abandoned work past the drain bound."""
        if deadline is None:
            self.handler.close()
            return
        closer = threading.Thread(target=self.handler.close, name=f"{self.handler.name}-close", daemon=True)
        closer.start()
        closer.join(max(1.0, deadline - time.monotonic()))
        if closer.is_alive():
            log.warning("%s: handler still closing at the end of the shutdown grace; leaving it",
                        self.handler.name)

    def _has_capacity(self) -> bool:
        # Batches whose outputs are only waiting for broker acks no longer hold the
        # handler; a few of them may queue up behind it.
        busy = sum(1 for item in self._in_flight if not item.produced)
        return busy < self.max_in_flight and len(self._in_flight) < self.max_in_flight + _MAX_AWAITING_ACKS

    def _backing_off(self) -> bool:
        return time.monotonic() < self._backoff_until

    def _step(self, consumer: ConsumerLike) -> None:
        self._settle_done()
        backing_off = self._backing_off()
        while not backing_off and self._ready and self._has_capacity():
            self._submit(self._ready.popleft())
        # Hysteresis: pause with a few batches ready locally, resume when down to one.
        # A pause drops what the client had prefetched and the refetch after a resume
        # takes a round trip or more, so pausing per batch would starve the handler.
        if backing_off or len(self._ready) >= _READY_HIGH:
            self._pause(consumer)
        elif len(self._ready) <= _READY_LOW:
            self._resume(consumer)
        if self._paused:
            # Sleep until the handler finishes something (or acks arrive), without
            # holding the GIL that the handler's own threads need.
            working = next((i.future for i in self._in_flight if not i.produced and i.future), None)
            if working is not None and not working.done():
                wait([working], timeout=0.05)
                self.producer.poll(0)
            else:
                self.producer.poll(0.05)
            # Still poll: that is what keeps this member in the group while it works.
            message = consumer.poll(0.0)
            if message is not None and (record := self._to_record(message)) is not None:
                self._ready.append([record])
            return
        # While work is in flight, come back quickly to hand over finished batches.
        timeout = self.batch_timeout_s if not self._in_flight else min(self.batch_timeout_s, 0.01)
        messages = consumer.consume(num_messages=self.batch_size, timeout=timeout)
        records = [r for r in (self._to_record(m) for m in messages) if r is not None]
        if records:
            if self._has_capacity():
                self._submit(records)
            else:
                self._ready.append(records)
        self.producer.poll(0)

    def _submit(self, records: list[RawRecord]) -> None:
        self.stats.batches += 1
        self.stats.records_in += len(records)
        self.metrics.records_consumed(len(records))
        item = _InFlight(records, batch_id=next(self._batch_ids))
        self.health.batch_started(item.batch_id)

        def emit(record: OutRecord) -> None:
            # Records a handler emits while it works count towards its batch's commit.
            if item.abandoned:
                raise BatchAbandoned(f"{self.handler.name}: batch abandoned")
            item.sent()
            self.producer.send(record, on_delivery=item.acked)
            self._count_output(record)

        try:
            item.future = self.handler.submit(records, emit)
        except Backpressure as exc:
            failed: Future[list[OutRecord]] = Future()
            failed.set_exception(exc)
            item.future = failed
        self._in_flight.append(item)
        self._documents_in_flight()

    def _count_output(self, record: OutRecord) -> None:
        self.stats.records_out += 1
        self.metrics.records_produced()
        if record.topic == self.settings.topics.dlq and record.value is not None:
            try:
                error_type = str(json.loads(record.value).get("error_type") or "unknown")
            except (ValueError, AttributeError):
                error_type = "unknown"
            self.metrics.dead_letter(error_type)

    def _documents_in_flight(self) -> None:
        keys = {r.key for item in self._in_flight if not item.produced for r in item.records}
        self.metrics.documents_in_flight(len(keys))

    def _batch_over(self, item: _InFlight) -> None:
        """``item`` left the handler (done, backed off or abandoned): liveness stops timing it."""
        self.health.batch_finished(item.batch_id)

    def _to_record(self, message: Message) -> RawRecord | None:
        err = message.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                self.health.connected(True)
                return None
            if err.fatal() or not err.retriable():
                # One line per kind of error and interval, with a count: an outage would repeat it per poll.
                process_kafka_log().emit(logging.ERROR, f"{self.handler.name}: consumer error: {err}")
            return None
        self.health.connected(True)
        key = message.key()
        ts_type, ts = message.timestamp()
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        # A consumed message without an error always carries its position.
        assert topic is not None and partition is not None and offset is not None
        return RawRecord(
            key=key.decode("utf-8", errors="replace") if key is not None else None,
            value=message.value(),
            position=RecordPosition(topic, partition, offset),
            timestamp_ms=ts if ts_type else None,
        )

    # -- completion, produce, commit ------------------------------------------------
    def _settle_done(self, block: bool = False, deadline: float | None = None) -> None:
        """Produce the outputs of finished batches, in order, and commit every batch whose
        outputs the broker has acknowledged. Nothing here blocks unless ``block``: acks
        arrive through the producer's callbacks while the loop keeps polling. With
        ``block``, waits for the handler and the acks, until ``deadline`` when given."""
        for item in list(self._in_flight):
            if item.produced:
                continue
            assert item.future is not None
            if block and not item.future.done():
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                wait([item.future], timeout=remaining)
            if not item.future.done():
                break  # keep output order: a later batch waits for an earlier one
            try:
                outputs = item.future.result()  # a handler bug surfaces here and stops the stage
            except Backpressure as exc:
                self._back_off(item, str(exc), exc.retry_after_s)
                break
            for record in outputs:
                item.sent()
                self.producer.send(record, on_delivery=item.acked)
                self._count_output(record)
            item.produced = True
            self._batch_over(item)
            self.metrics.batch_done(len(item.records), time.perf_counter() - item.started)
            self._documents_in_flight()
        self.producer.poll(0)
        if block:
            ack_deadline = time.monotonic() + 120 if deadline is None else deadline
            while any(i.produced and not i.durable for i in self._in_flight):
                if time.monotonic() > ack_deadline:
                    if deadline is None:
                        raise DeliveryFailed("outputs not acknowledged within 120 s")
                    break
                self.producer.poll(0.05)
        committable: list[_InFlight] = []
        while self._in_flight and self._in_flight[0].durable:
            head = self._in_flight[0]
            if head.errors:
                # The broker refused some outputs (it was down past the delivery
                # timeout, say): redo the batch rather than commit a hole.
                self._back_off(head, "broker refused records: " + "; ".join(head.errors[:5]), None)
                break
            committable.append(self._in_flight.popleft())
        if committable:
            self._commit([r for item in committable for r in item.records], synchronous=block)
            self.stats.batches_committed += len(committable)
            self._refusals = 0

    def _back_off(self, failed: _InFlight, reason: str, retry_after_s: float | None) -> None:
        """Undo ``failed`` and every batch after it: seek their partitions back to the
        first uncommitted offset, pause, and hand them over again after a delay."""
        items = list(self._in_flight)
        redo = items[items.index(failed):]
        self._in_flight = deque(items[: items.index(failed)])
        rewind: dict[tuple[str, int], int] = {}
        for item in redo:
            item.abandoned = True
            self._batch_over(item)
            if item.future is not None:
                item.future.cancel()
            for key, offset in item.first_offsets().items():
                rewind[key] = min(rewind.get(key, offset), offset)
        for batch in self._ready:
            for r in batch:
                key = (r.position.topic, r.position.partition)
                rewind[key] = min(rewind.get(key, r.position.offset), r.position.offset)
        self._ready.clear()
        self._refusals += 1
        self.backpressure_events += 1
        delay = retry_after_s if retry_after_s is not None else min(
            _BACKPRESSURE_MAX_S, _BACKPRESSURE_FIRST_S * 2 ** (self._refusals - 1))
        self._backoff_until = time.monotonic() + delay
        log.warning("%s: backpressure (%s); pausing and retrying %d records in %.1fs",
                    self.handler.name, reason, sum(len(i.records) for i in redo), delay)
        consumer = self._consumer
        assert consumer is not None
        self._pause(consumer)
        for (topic, partition), offset in rewind.items():
            if (topic, partition) not in self.assigned:
                continue  # its next owner starts from our last commit anyway
            try:
                consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:
                log.warning("%s: seek %s/%s to %s failed: %s", self.handler.name, topic, partition, offset, exc)

    def _commit(self, records: Sequence[RawRecord], synchronous: bool = False) -> None:
        highest: dict[tuple[str, int], int] = {}
        for r in records:
            key = (r.position.topic, r.position.partition)
            highest[key] = max(highest.get(key, -1), r.position.offset)
        offsets = [TopicPartition(t, p, o + 1) for (t, p), o in highest.items()]
        self._commit_offsets(offsets, synchronous)
        for tp in offsets:
            self._last_committed[(tp.topic, tp.partition)] = tp

    def _commit_offsets(self, offsets: list[TopicPartition], synchronous: bool, give_up_after_s: float = 60.0) -> None:
        consumer = self._consumer
        assert consumer is not None

        def commit() -> None:
            # Asynchronous in the steady state (librdkafka keeps commit order, and a
            # later commit covers a failed earlier one); synchronous on revoke and stop.
            if synchronous:
                consumer.commit(offsets=offsets, asynchronous=False)
            else:
                consumer.commit(offsets=offsets, asynchronous=True)

        retrying = Retrying(
            retry=retry_if_exception(_retriable_commit_error),
            wait=wait_exponential(multiplier=0.2, max=5.0),
            stop=stop_after_delay(give_up_after_s),
            before_sleep=lambda state: log.warning("%s: commit failed (%s); retrying", self.handler.name,
                                                   state.outcome.exception() if state.outcome else None),
            reraise=True,
        )
        try:
            retrying(commit)
        except KafkaException as exc:
            if exc.args[0].code() not in _COMMIT_GIVE_UP_CODES:
                raise
            # Partitions moved on: the new owner replays from the last commit and
            # the writes are idempotent, so nothing is lost.
            log.warning("%s: commit skipped after rebalance: %s", self.handler.name, exc)
            return
        self.stats.commits += 1
        self.stats.last_commit_at = time.time()

    # -- pause / resume --------------------------------------------------------------
    def _pause(self, consumer: ConsumerLike) -> None:
        if not self._paused:
            consumer.pause(consumer.assignment())
            self._paused = True

    def _resume(self, consumer: ConsumerLike) -> None:
        if self._paused:
            consumer.resume(consumer.assignment())
            self._paused = False

    # -- rebalance -------------------------------------------------------------------
    def _on_assign(self, consumer: ConsumerLike, partitions: list[TopicPartition]) -> None:
        self.assigned |= {(p.topic, p.partition) for p in partitions}
        self.health.assigned(len(self.assigned))
        self.health.connected(True)
        # librdkafka remembers a pause per partition even across a loss and
        # reassignment, so state it explicitly: a partition paused before it was lost
        # would otherwise come back paused and never be fetched again.
        if self._paused:
            consumer.pause(partitions)
        else:
            consumer.resume(partitions)
        log.info("%s: assigned %s", self.handler.name, [(p.topic, p.partition) for p in partitions])

    def _on_revoke(self, consumer: ConsumerLike, partitions: list[TopicPartition]) -> None:
        # Finish what is in flight and commit it before the partitions go, so the next
        # owner does not redo it. Bounded by one batch's processing time. Nothing is
        # raised out of here: librdkafka would surface it from poll() mid-rebalance.
        try:
            if self._stopping:
                # Shutdown already waited its grace: only commit what is durable.
                self._settle_done(block=True, deadline=time.monotonic())
            else:
                self._settle_done(block=True)
        except (CancelledError, BatchAbandoned):
            pass
        except Exception as exc:
            log.exception("%s: could not settle in-flight work on revoke", self.handler.name)
            if not self._stopping:
                self._failure = exc
        self._forget(partitions)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        """Drop consumed-but-unstarted records of partitions we no longer own: their next
        owner resumes from our last commit, so they are not lost."""
        gone = {(p.topic, p.partition) for p in partitions}
        self.assigned -= gone
        self.health.assigned(len(self.assigned))
        for key in gone:
            self._last_committed.pop(key, None)
        kept = [[r for r in batch if (r.position.topic, r.position.partition) not in gone] for batch in self._ready]
        self._ready = deque(batch for batch in kept if batch)

    def _on_lost(self, consumer: ConsumerLike, partitions: list[TopicPartition]) -> None:
        log.warning("%s: partitions lost: %s", self.handler.name, partitions)
        self._forget(partitions)

    def _shutdown(self, consumer: ConsumerLike, deadline: float) -> None:
        """Stop polling, give in-flight work until ``deadline``, commit what is durable,
        and abandon the rest uncommitted."""
        while self._in_flight and time.monotonic() < deadline:
            self._settle_done()
            working = next((i.future for i in self._in_flight if not i.produced and i.future), None)
            if working is not None and not working.done():
                wait([working], timeout=min(0.05, max(0.0, deadline - time.monotonic())))
            self.producer.poll(0.01)
        self._stopping = True
        if self._in_flight:
            # Abandoned without a commit: the group replays them after restart.
            log.warning("%s: abandoning %d in-flight batches uncommitted at shutdown",
                        self.handler.name, len(self._in_flight))
            for item in self._in_flight:
                item.abandoned = True
                self._batch_over(item)
                if item.future is not None:
                    item.future.cancel()
            self._in_flight.clear()
            self._documents_in_flight()
        self._ready.clear()
        if self._last_committed:
            # Make sure the asynchronous commits landed before leaving the group.
            try:
                self._commit_offsets(list(self._last_committed.values()), synchronous=True,
                                     give_up_after_s=max(1.0, deadline - time.monotonic()))
            except KafkaException as exc:
                log.warning("%s: final commit failed: %s; the group replays from the last one", self.handler.name, exc)
        self.producer.close(timeout_s=max(1.0, deadline - time.monotonic()))
