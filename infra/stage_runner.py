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
the consumer in its group however long a batch takes.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from colstream.infra.kafka import DeliveryFailed, OutRecord, ProducerClient
from colstream.infra.settings import ColstreamSettings
from colstream.schemas import DeadLetter, RecordPosition, encode

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RawRecord:
    key: str | None
    value: bytes | None
    position: RecordPosition
    timestamp_ms: int | None = None


Emit = Callable[[OutRecord], None]

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


def dead_letter(
    stage: str,
    dlq_topic: str,
    record: RawRecord,
    error_type: str,
    message: str,
    *,
    document_id: str | None = None,
    version: int | None = None,
    page_number: int | None = None,
) -> OutRecord:
    """Build the dead letter for ``record``; the original key and value travel with it."""
    original_value: str | None = None
    original_b64: str | None = None
    if record.value is not None:
        try:
            original_value = record.value.decode("utf-8")
        except UnicodeDecodeError:
            import base64

            original_b64 = base64.b64encode(record.value).decode("ascii")
    letter = DeadLetter(
        stage=stage,
        error_type=error_type,
        message=message,
        source_topic=record.position.topic,
        source_partition=record.position.partition,
        source_offset=record.position.offset,
        original_key=record.key,
        original_value=original_value,
        original_value_b64=original_b64,
        document_id=document_id,
        version=version,
        page_number=page_number,
    )
    log.warning("dead-letter %s %s@%s/%s: %s: %s", stage, record.position.topic,
                record.position.partition, record.position.offset, error_type, message)
    return OutRecord(dlq_topic, record.key or document_id, encode(letter))


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
    future: Future[list[OutRecord]] | None = None
    produced: bool = False
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
        shutdown_grace_s: float = 20.0,
        producer: ProducerClient | None = None,
    ) -> None:
        self.settings = settings
        self.handler = handler
        self.topics = list(topics)
        self.group_id = group_id
        self.batch_size = batch_size
        self.batch_timeout_s = batch_timeout_ms / 1000
        self.max_in_flight = max_in_flight
        self.shutdown_grace_s = shutdown_grace_s
        self.producer = producer or ProducerClient(settings)
        self.stats = StageStats()
        self._stop = threading.Event()
        self._in_flight: deque[_InFlight] = deque()
        self._consumer: Consumer | None = None
        self._paused = False
        self._last_committed: dict[tuple[str, int], TopicPartition] = {}
        # Consumed but not yet handed to the handler (at most about one batch).
        self._ready: deque[list[RawRecord]] = deque()
        self.assigned: set[tuple[str, int]] = set()

    # -- lifecycle -----------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.request_stop())

    def run(self) -> None:
        consumer = Consumer(self.settings.kafka.consumer_config(self.group_id))
        self._consumer = consumer
        consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                           on_lost=self._on_lost)
        log.info("%s: consuming %s as group %s", self.handler.name, self.topics, self.group_id)
        try:
            while not self._stop.is_set():
                self._step(consumer)
            self._shutdown(consumer)
        finally:
            try:
                consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log.warning("%s: consumer close: %s", self.handler.name, exc)
            self.handler.close()

    def _has_capacity(self) -> bool:
        # Batches whose outputs are only waiting for broker acks no longer hold the
        # handler; a few of them may queue up behind it.
        busy = sum(1 for item in self._in_flight if not item.produced)
        return busy < self.max_in_flight and len(self._in_flight) < self.max_in_flight + _MAX_AWAITING_ACKS

    def _step(self, consumer: Consumer) -> None:
        self._settle_done()
        while self._ready and self._has_capacity():
            self._submit(self._ready.popleft())
        # Hysteresis: pause with a few batches ready locally, resume when down to one.
        # A pause drops what the client had prefetched and the refetch after a resume
        # takes a round trip or more, so pausing per batch would starve the handler.
        if len(self._ready) >= _READY_HIGH:
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
        item = _InFlight(records)

        def emit(record: OutRecord) -> None:
            # Records a handler emits while it works count towards its batch's commit.
            item.sent()
            self.producer.send(record, on_delivery=item.acked)

        item.future = self.handler.submit(records, emit)
        self._in_flight.append(item)

    def _to_record(self, message: Message) -> RawRecord | None:
        err = message.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                return None
            if err.fatal() or not err.retriable():
                log.error("%s: consumer error: %s", self.handler.name, err)
            return None
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
    def _settle_done(self, block: bool = False) -> None:
        """Produce the outputs of finished batches, in order, and commit every batch whose
        outputs the broker has acknowledged. Nothing here blocks unless ``block``: acks
        arrive through the producer's callbacks while the loop keeps polling."""
        for item in self._in_flight:
            if item.produced:
                continue
            assert item.future is not None
            if not (block or item.future.done()):
                break  # keep output order: a later batch waits for an earlier one
            outputs = item.future.result()  # a handler bug surfaces here and stops the stage
            for record in outputs:
                item.sent()
                self.producer.send(record, on_delivery=item.acked)
            item.produced = True
            self.stats.records_out += len(outputs)
        self.producer.poll(0)
        if block:
            deadline = time.monotonic() + 120
            while any(not i.durable for i in self._in_flight):
                if time.monotonic() > deadline:
                    raise DeliveryFailed("outputs not acknowledged within 120 s")
                self.producer.poll(0.05)
        committable: list[_InFlight] = []
        while self._in_flight and self._in_flight[0].durable:
            head = self._in_flight.popleft()
            if head.errors:
                raise DeliveryFailed("broker refused records: " + "; ".join(head.errors[:5]))
            committable.append(head)
        if committable:
            self._commit([r for item in committable for r in item.records], synchronous=block)
            self.stats.batches_committed += len(committable)

    def _commit(self, records: Sequence[RawRecord], synchronous: bool = False) -> None:
        highest: dict[tuple[str, int], int] = {}
        for r in records:
            key = (r.position.topic, r.position.partition)
            highest[key] = max(highest.get(key, -1), r.position.offset)
        offsets = [TopicPartition(t, p, o + 1) for (t, p), o in highest.items()]
        self._commit_offsets(offsets, synchronous)
        for tp in offsets:
            self._last_committed[(tp.topic, tp.partition)] = tp

    def _commit_offsets(self, offsets: list[TopicPartition], synchronous: bool) -> None:
        assert self._consumer is not None
        delay = 0.2
        while True:
            try:
                # Asynchronous in the steady state (librdkafka keeps commit order, and a
                # later commit covers a failed earlier one); synchronous on revoke and stop.
                if synchronous:
                    self._consumer.commit(offsets=offsets, asynchronous=False)
                else:
                    self._consumer.commit(offsets=offsets, asynchronous=True)
                break
            except KafkaException as exc:
                code = exc.args[0].code()
                if code in (KafkaError._NO_OFFSET, KafkaError.UNKNOWN_MEMBER_ID,
                            KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS,
                            KafkaError._ASSIGNMENT_LOST, KafkaError._STATE):
                    # Partitions moved on: the new owner replays from the last commit and
                    # the writes are idempotent, so nothing is lost.
                    log.warning("%s: commit skipped after rebalance: %s", self.handler.name, exc)
                    return
                log.warning("%s: commit failed (%s); retrying", self.handler.name, exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.stats.commits += 1
        self.stats.last_commit_at = time.time()

    # -- backpressure ----------------------------------------------------------------
    def _pause(self, consumer: Consumer) -> None:
        if not self._paused:
            consumer.pause(consumer.assignment())
            self._paused = True

    def _resume(self, consumer: Consumer) -> None:
        if self._paused:
            consumer.resume(consumer.assignment())
            self._paused = False

    # -- rebalance -------------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned |= {(p.topic, p.partition) for p in partitions}
        # librdkafka remembers a pause per partition even across a loss and
        # reassignment, so state it explicitly: a partition paused before it was lost
        # would otherwise come back paused and never be fetched again.
        if self._paused:
            consumer.pause(partitions)
        else:
            consumer.resume(partitions)
        log.info("%s: assigned %s", self.handler.name, [(p.topic, p.partition) for p in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Finish what is in flight and commit it before the partitions go, so the next
        # owner does not redo it. Bounded by one batch's processing time.
        try:
            self._settle_done(block=True)
        except Exception:
            log.exception("%s: could not settle in-flight work on revoke", self.handler.name)
            raise
        self._forget(partitions)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        """Drop consumed-but-unstarted records of partitions we no longer own: their next
        owner resumes from our last commit, so they are not lost."""
        gone = {(p.topic, p.partition) for p in partitions}
        self.assigned -= gone
        for key in gone:
            self._last_committed.pop(key, None)
        kept = [[r for r in batch if (r.position.topic, r.position.partition) not in gone] for batch in self._ready]
        self._ready = deque(batch for batch in kept if batch)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning("%s: partitions lost: %s", self.handler.name, partitions)
        self._forget(partitions)

    def _shutdown(self, consumer: Consumer) -> None:
        """Stop polling, give in-flight work ``shutdown_grace_s`` to finish, commit what is durable."""
        deadline = time.monotonic() + self.shutdown_grace_s
        while self._in_flight and time.monotonic() < deadline:
            self._settle_done()
            self.producer.poll(0.05)
        if self._in_flight:
            # Abandoned without a commit: the group replays them after restart.
            log.warning("%s: abandoning %d in-flight batches uncommitted at shutdown",
                        self.handler.name, len(self._in_flight))
            for item in self._in_flight:
                if item.future is not None:
                    item.future.cancel()
        if self._last_committed:
            # Make sure the asynchronous commits landed before leaving the group.
            self._commit_offsets(list(self._last_committed.values()), synchronous=True)
        self.producer.close()
