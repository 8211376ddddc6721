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

from colstream.infra.kafka import OutRecord, ProducerClient
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
    last_commit_at: float | None = None
    started_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "batches": self.batches,
            "records_in": self.records_in,
            "records_out": self.records_out,
            "commits": self.commits,
            "last_commit_at": self.last_commit_at,
            "uptime_s": round(time.time() - self.started_at, 1),
        }


@dataclass
class _InFlight:
    records: list[RawRecord]
    future: Future[list[OutRecord]]


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

    def _step(self, consumer: Consumer) -> None:
        self._settle_done()
        if self._ready and len(self._in_flight) < self.max_in_flight:
            self._submit(self._ready.popleft())
        if len(self._in_flight) >= self.max_in_flight and self._ready:
            # Full: one batch waits locally, the rest stays on the broker. Pausing only
            # now (not after every batch) matters: a pause drops what the client had
            # prefetched, and the refetch after resume can wait out fetch.wait.max.ms.
            self._pause(consumer)
            # Still poll: that is what keeps this member in the group while it works.
            message = consumer.poll(0.05)
            if message is not None and (record := self._to_record(message)) is not None:
                self._ready.append([record])
            return
        self._resume(consumer)
        # While work is in flight, come back quickly to hand over finished batches.
        timeout = self.batch_timeout_s if not self._in_flight else min(self.batch_timeout_s, 0.02)
        messages = consumer.consume(num_messages=self.batch_size, timeout=timeout)
        records = [r for r in (self._to_record(m) for m in messages) if r is not None]
        if records:
            if len(self._in_flight) < self.max_in_flight:
                self._submit(records)
            else:
                self._ready.append(records)
        self.producer.producer.poll(0)

    def _submit(self, records: list[RawRecord]) -> None:
        self.stats.batches += 1
        self.stats.records_in += len(records)
        future = self.handler.submit(records, self.producer.send)
        self._in_flight.append(_InFlight(records, future))

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
        return RawRecord(
            key=key.decode("utf-8", errors="replace") if key is not None else None,
            value=message.value(),
            position=RecordPosition(message.topic(), message.partition(), message.offset()),
            timestamp_ms=ts if ts_type else None,
        )

    # -- completion, produce, commit ------------------------------------------------
    def _settle_done(self, wait: bool = False) -> None:
        while self._in_flight and (wait or self._in_flight[0].future.done()):
            head = self._in_flight[0]
            outputs = head.future.result()  # a handler bug surfaces here and stops the stage
            self.producer.send_all(outputs)
            self.producer.flush_or_raise()
            self._commit(head.records)
            self.stats.records_out += len(outputs)
            self._in_flight.popleft()

    def _commit(self, records: Sequence[RawRecord]) -> None:
        highest: dict[tuple[str, int], int] = {}
        for r in records:
            key = (r.position.topic, r.position.partition)
            highest[key] = max(highest.get(key, -1), r.position.offset)
        offsets = [TopicPartition(t, p, o + 1) for (t, p), o in highest.items()]
        assert self._consumer is not None
        delay = 0.2
        while True:
            try:
                self._consumer.commit(offsets=offsets, asynchronous=False)
                break
            except KafkaException as exc:
                code = exc.args[0].code()
                if code in (KafkaError._NO_OFFSET, KafkaError.UNKNOWN_MEMBER_ID,
                            KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS,
                            KafkaError._ASSIGNMENT_LOST):
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
        if self._paused:
            consumer.pause(partitions)
        log.info("%s: assigned %s", self.handler.name, [(p.topic, p.partition) for p in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Finish what is in flight and commit it before the partitions go, so the next
        # owner does not redo it. Bounded by one batch's processing time.
        try:
            self._settle_done(wait=True)
        except Exception:
            log.exception("%s: could not settle in-flight work on revoke", self.handler.name)
            raise
        self._forget(partitions)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        """Drop consumed-but-unstarted records of partitions we no longer own: their next
        owner resumes from our last commit, so they are not lost."""
        gone = {(p.topic, p.partition) for p in partitions}
        self.assigned -= gone
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
            if self._in_flight:
                wait([self._in_flight[0].future], timeout=max(0.0, min(0.2, deadline - time.monotonic())))
        if self._in_flight:
            # Abandoned without a commit: the group replays them after restart.
            log.warning("%s: abandoning %d in-flight batches uncommitted at shutdown",
                        self.handler.name, len(self._in_flight))
            for item in self._in_flight:
                item.future.cancel()
        self.producer.close()
