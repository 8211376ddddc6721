"""An in-memory Kafka: topics with partitions, committed offsets per group, and a
consumer and producer with the calls :class:`~colstream.infra.stage_runner.StageRunner`
and :class:`~colstream.infra.kafka.ProducerClient` make.

It is a single-member group with no network: assignment happens on the first poll,
deliveries are acknowledged when the producer is polled (or held back, or refused,
on request), and a rebalance happens when a test calls :meth:`FakeConsumer.rebalance`.
The messages handed out are real ``confluent_kafka.Message`` objects.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, overload

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from colstream.infra.kafka import DeliveryCallback, RebalanceCallback


@dataclass(frozen=True)
class StoredRecord:
    key: bytes | None
    value: bytes | None
    offset: int


@dataclass
class InMemoryBroker:
    """Topics by name, each a list of partitions; committed offsets by (group, topic, partition)."""

    default_partitions: int = 1
    topics: dict[str, list[list[StoredRecord]]] = field(default_factory=dict)
    committed: dict[tuple[str, str, int], int] = field(default_factory=dict)
    # Every commit call, in order: (group, [(topic, partition, offset)], asynchronous).
    commit_log: list[tuple[str, list[tuple[str, int, int]], bool]] = field(default_factory=list)
    # Errors the next commit calls raise (a KafkaError each), first one first.
    commit_errors: list[KafkaError] = field(default_factory=list)
    # While set, deliveries stay unacknowledged; ``refuse_deliveries`` n: the next n fail.
    hold_acks: bool = False
    refuse_deliveries: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock)

    def create_topic(self, name: str, partitions: int | None = None) -> None:
        with self.lock:
            self.topics.setdefault(name, [[] for _ in range(partitions or self.default_partitions)])

    def partition_for(self, topic: str, key: bytes | None) -> int:
        self.create_topic(topic)
        count = len(self.topics[topic])
        return zlib.crc32(key) % count if key is not None else 0

    def append(self, topic: str, key: str | bytes | None, value: str | bytes | None, partition: int = -1) -> int:
        """Write one record (as a producer the test controls); returns its offset."""
        raw_key = key.encode() if isinstance(key, str) else key
        raw_value = value.encode() if isinstance(value, str) else value
        with self.lock:
            part = partition if partition >= 0 else self.partition_for(topic, raw_key)
            log = self.topics[topic][part]
            log.append(StoredRecord(raw_key, raw_value, len(log)))
            return len(log) - 1

    def records(self, topic: str) -> list[tuple[int, StoredRecord]]:
        """Every record of ``topic`` as (partition, record), partition by partition."""
        with self.lock:
            return [(p, r) for p, log in enumerate(self.topics.get(topic, [])) for r in log]

    def values(self, topic: str) -> list[bytes | None]:
        return [r.value for _, r in self.records(topic)]

    def committed_offset(self, group: str, topic: str, partition: int = 0) -> int | None:
        return self.committed.get((group, topic, partition))

    # factories, as StageRunner and ProducerClient take them
    def consumer(self, config: dict[str, Any]) -> FakeConsumer:
        return FakeConsumer(self, str(config["group.id"]))

    def producer(self, config: dict[str, Any]) -> FakeProducer:
        return FakeProducer(self)


class FakeConsumer:
    def __init__(self, broker: InMemoryBroker, group_id: str) -> None:
        self.broker = broker
        self.group_id = group_id
        self.topics: list[str] = []
        self._on_assign: RebalanceCallback | None = None
        self._on_revoke: RebalanceCallback | None = None
        self._assigned: list[tuple[str, int]] = []
        self._needs_assignment = False
        self.positions: dict[tuple[str, int], int] = {}
        self.paused: set[tuple[str, int]] = set()
        self.seeks: list[tuple[str, int, int]] = []
        self._rebalance_requested = False
        self.pause_calls = 0
        self.resume_calls = 0
        self.closed = False

    def subscribe(
        self,
        topics: list[str],
        on_assign: RebalanceCallback | None = None,
        on_revoke: RebalanceCallback | None = None,
        on_lost: RebalanceCallback | None = None,
    ) -> None:
        self.topics = list(topics)
        self._on_assign, self._on_revoke = on_assign, on_revoke
        self._needs_assignment = True

    def _assign_if_needed(self) -> None:
        if not self._needs_assignment:
            return
        self._needs_assignment = False
        parts: list[tuple[str, int]] = []
        for topic in self.topics:
            self.broker.create_topic(topic)
            parts += [(topic, p) for p in range(len(self.broker.topics[topic]))]
        self._assigned = parts
        for key in parts:
            self.positions[key] = self.broker.committed.get((self.group_id, *key), 0)
        if self._on_assign is not None:
            self._on_assign(self, [TopicPartition(t, p) for t, p in parts])

    def request_rebalance(self) -> None:
        """On the next poll (on the polling thread, as librdkafka does), revoke every
        partition and assign them again."""
        self._rebalance_requested = True

    def rebalance(self) -> None:
        """Revoke every partition (the revoke callback runs now) and assign them again on the next poll."""
        self._rebalance_requested = False
        parts = [TopicPartition(t, p) for t, p in self._assigned]
        if self._on_revoke is not None:
            self._on_revoke(self, parts)
        self._assigned = []
        self.paused.clear()
        self._needs_assignment = True

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        if self._rebalance_requested:
            self.rebalance()
        self._assign_if_needed()
        out: list[Message] = []
        with self.broker.lock:
            for topic, part in self._assigned:
                if (topic, part) in self.paused:
                    continue
                log = self.broker.topics[topic][part]
                while len(out) < num_messages and self.positions[(topic, part)] < len(log):
                    record = log[self.positions[(topic, part)]]
                    out.append(Message(topic=topic, partition=part, offset=record.offset, key=record.key,
                                       value=record.value, timestamp=(1, int(time.time() * 1000))))
                    self.positions[(topic, part)] += 1
        if not out and timeout > 0:
            time.sleep(min(timeout, 0.005))
        return out

    def poll(self, timeout: float = -1) -> Message | None:
        messages = self.consume(1, timeout)
        return messages[0] if messages else None

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in self._assigned]

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.pause_calls += 1
        self.paused |= {(tp.topic, tp.partition) for tp in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.resume_calls += 1
        self.paused -= {(tp.topic, tp.partition) for tp in partitions}

    def seek(self, partition: TopicPartition) -> None:
        self.seeks.append((partition.topic, partition.partition, partition.offset))
        self.positions[(partition.topic, partition.partition)] = partition.offset

    @overload
    def commit(self, *, offsets: list[TopicPartition], asynchronous: Literal[True] = ...) -> None: ...

    @overload
    def commit(self, *, offsets: list[TopicPartition], asynchronous: Literal[False]) -> list[TopicPartition]: ...

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool = True) -> list[TopicPartition] | None:
        with self.broker.lock:
            if self.broker.commit_errors:
                raise KafkaException(self.broker.commit_errors.pop(0))
            self.broker.commit_log.append(
                (self.group_id, [(tp.topic, tp.partition, tp.offset) for tp in offsets], asynchronous))
            for tp in offsets:
                self.broker.committed[(self.group_id, tp.topic, tp.partition)] = tp.offset
        return None if asynchronous else offsets

    def close(self) -> None:
        if not self.closed and self._assigned and self._on_revoke is not None:
            self._on_revoke(self, self.assignment())
        self._assigned = []
        self.closed = True


@dataclass
class _Pending:
    topic: str
    key: bytes | None
    value: bytes | None
    partition: int
    on_delivery: DeliveryCallback | None


class FakeProducer:
    def __init__(self, broker: InMemoryBroker) -> None:
        self.broker = broker
        self._pending: list[_Pending] = []
        self._lock = threading.Lock()

    def produce(
        self,
        topic: str,
        value: str | bytes | None = None,
        key: str | bytes | None = None,
        partition: int = -1,
        callback: DeliveryCallback | None = None,
        on_delivery: DeliveryCallback | None = None,
        timestamp: int = 0,
        headers: Any = None,
    ) -> None:
        raw_key = key.encode() if isinstance(key, str) else key
        raw_value = value.encode() if isinstance(value, str) else value
        with self._lock:
            self._pending.append(_Pending(topic, raw_key, raw_value, partition, on_delivery or callback))

    def poll(self, timeout: float = -1) -> int:
        if self.broker.hold_acks:
            if timeout > 0:
                time.sleep(min(timeout, 0.005))
            return 0
        with self._lock:
            pending, self._pending = self._pending, []
        for item in pending:
            callback: Callable[[KafkaError | None, Message], None] | None = item.on_delivery
            if self.broker.refuse_deliveries > 0:
                self.broker.refuse_deliveries -= 1
                if callback is not None:
                    callback(KafkaError(KafkaError._MSG_TIMED_OUT, "refused by the test"), Message(topic=item.topic))
                continue
            offset = self.broker.append(item.topic, item.key, item.value, item.partition)
            if callback is not None:
                callback(None, Message(topic=item.topic, offset=offset, key=item.key, value=item.value))
        return len(pending)

    def flush(self, timeout: float = -1) -> int:
        self.poll(0)
        with self._lock:
            return len(self._pending)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)
