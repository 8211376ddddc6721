"""Thin confluent-kafka plumbing: lazily built clients, topic creation, produce-and-wait.

The stage runner and :class:`ProducerClient` build their clients through factories
(:data:`ConsumerFactory`, :data:`ProducerFactory`), so the same code runs on the
real librdkafka clients and on the in-memory broker of :mod:`colstream.testing`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, overload

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from colstream.infra.settings import ColstreamSettings, TopicSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RecordPosition:
    """Where a consumed record sits: it travels beside the payload, never inside it."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class OutRecord:
    topic: str
    key: str | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


DeliveryCallback = Callable[[KafkaError | None, Message], None]
RebalanceCallback = Callable[[Any, list[TopicPartition]], None]


class ConsumerLike(Protocol):
    """What the stage runner uses of a consumer (librdkafka's, or an in-memory fake)."""

    def subscribe(
        self,
        topics: list[str],
        on_assign: RebalanceCallback | None = None,
        on_revoke: RebalanceCallback | None = None,
        on_lost: RebalanceCallback | None = None,
    ) -> None: ...

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]: ...

    def poll(self, timeout: float = -1) -> Message | None: ...

    def assignment(self) -> list[TopicPartition]: ...

    def pause(self, partitions: list[TopicPartition]) -> None: ...

    def resume(self, partitions: list[TopicPartition]) -> None: ...

    def seek(self, partition: TopicPartition) -> None: ...

    @overload
    def commit(self, *, offsets: list[TopicPartition], asynchronous: Literal[True] = ...) -> None: ...

    @overload
    def commit(self, *, offsets: list[TopicPartition], asynchronous: Literal[False]) -> list[TopicPartition]: ...

    def close(self) -> None: ...


class ProducerLike(Protocol):
    """What :class:`ProducerClient` uses of a producer."""

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
    ) -> None: ...

    def poll(self, timeout: float = -1) -> int: ...

    def flush(self, timeout: float = -1) -> int: ...


ConsumerFactory = Callable[[dict[str, Any]], ConsumerLike]
ProducerFactory = Callable[[dict[str, Any]], ProducerLike]


def kafka_consumer(config: dict[str, Any]) -> ConsumerLike:
    return Consumer(config)


def kafka_producer(config: dict[str, Any]) -> ProducerLike:
    return Producer(config)


class DeliveryFailed(RuntimeError):
    """The broker did not take the record: it was never written."""


class DeliveryOutcomeUnknown(DeliveryFailed):
    """The record may or may not have been written (no acknowledgement in time, or one lost
    on the way): it can still be delivered later from the producer's queue. Anything it
    references must be kept, and sending it again under the same key is safe."""


# Errors after which a record may already sit in the log.
_AMBIGUOUS_ERRORS = frozenset(
    {
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        KafkaError._PURGE_INFLIGHT,
    }
)


def delivery_error(topic: str, err: KafkaError) -> DeliveryFailed:
    kind = DeliveryOutcomeUnknown if err.code() in _AMBIGUOUS_ERRORS else DeliveryFailed
    return kind(f"{topic}: {err.str()}")


@dataclass
class DeliveryRefusals:
    """The refusals among deliveries sent without a callback of their own, kept until
    ``flush_or_raise`` reports them."""

    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def callback(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            with self.lock:
                self.errors.append(f"{msg.topic()}: {err.str()}")

    def take_errors(self) -> list[str]:
        with self.lock:
            errors, self.errors = self.errors, []
        return errors


class ProducerClient:
    """One Kafka producer, created on first use. Nothing here flushes on a stage's behalf;
    each kind of caller learns that its records are durable its own way:

    * stages: ``send(record, on_delivery=...)`` per output record; the runner counts a
      batch's acknowledgements (served by ``poll``) and commits the batch's input offsets
      only once all of them arrived without error;
    * the API's publisher: ``send_and_wait`` for one record, which returns its partition
      and offset or raises :class:`DeliveryOutcomeUnknown` / :class:`DeliveryFailed`;
    * tools (the dead-letter redrive): ``send`` without a callback, whose outcome is kept
      here, then ``flush_or_raise``, which waits for every record queued so far and raises
      :class:`DeliveryFailed` if the broker refused one of those kept here.

    ``send`` blocks only while librdkafka's local queue is full, polling meanwhile.
    ``close`` waits at most ``timeout_s`` for what is still queued and drops the rest."""

    def __init__(
        self,
        settings: ColstreamSettings,
        extra: dict[str, Any] | None = None,
        *,
        factory: ProducerFactory = kafka_producer,
    ) -> None:
        self._settings = settings
        self._extra = extra or {}
        self._factory = factory
        self._producer: ProducerLike | None = None
        self._refusals = DeliveryRefusals()
        self._lock = threading.Lock()

    @property
    def producer(self) -> ProducerLike:
        with self._lock:
            if self._producer is None:
                self._producer = self._factory({**self._settings.kafka.producer_config(), **self._extra})
            return self._producer

    def send(self, record: OutRecord, on_delivery: DeliveryCallback | None = None) -> None:
        while True:
            try:
                self.producer.produce(
                    record.topic,
                    key=record.key.encode("utf-8") if record.key is not None else None,
                    value=record.value,
                    headers=list(record.headers) or None,
                    on_delivery=on_delivery or self._refusals.callback,
                )
                break
            except BufferError:
                # Local queue full: let deliveries drain, which is the backpressure we want.
                self.producer.poll(0.1)
        self.producer.poll(0)

    def send_and_wait(self, record: OutRecord, timeout_s: float = 60.0) -> tuple[int, int]:
        """Send one record and return its (partition, offset) once acknowledged.

        Raises :class:`DeliveryOutcomeUnknown` when no acknowledgement came within
        ``timeout_s`` (the record stays queued and may still be written) or the error
        leaves it open whether the broker wrote it; :class:`DeliveryFailed` when it
        certainly was not written."""
        acked: dict[str, Any] = {}

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            acked["err"], acked["partition"], acked["offset"] = err, msg.partition(), msg.offset()

        self.producer.produce(
            record.topic,
            key=record.key.encode("utf-8") if record.key is not None else None,
            value=record.value,
            headers=list(record.headers) or None,
            on_delivery=on_delivery,
        )
        deadline = time.monotonic() + timeout_s
        while "offset" not in acked:
            if time.monotonic() > deadline:
                raise DeliveryOutcomeUnknown(
                    f"record to {record.topic} not acknowledged within {timeout_s:g}s; it is still queued "
                    "and may be written once the broker answers"
                )
            self.producer.poll(0.1)
        if acked["err"] is not None:
            raise delivery_error(record.topic, acked["err"])
        return int(acked["partition"]), int(acked["offset"])

    def flush_or_raise(self, timeout_s: float = 120.0) -> None:
        """Return only once the broker acknowledged every record sent so far."""
        if self._producer is None:
            return
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = self._producer.flush(timeout=min(5.0, max(0.1, deadline - time.monotonic())))
            if remaining == 0:
                break
            if time.monotonic() > deadline:
                raise DeliveryFailed(f"{remaining} records not acknowledged within {timeout_s:.0f}s")
        errors = self._refusals.take_errors()
        if errors:
            raise DeliveryFailed("broker refused records: " + "; ".join(errors[:5]))

    def poll(self, timeout_s: float = 0.0) -> None:
        """Serve delivery callbacks."""
        if self._producer is not None:
            self._producer.poll(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        if self._producer is not None:
            self._producer.flush(timeout_s)
            self._producer = None


def admin_client(settings: ColstreamSettings) -> AdminClient:
    return AdminClient(settings.kafka.common_config())


def topic_specs(topics: TopicSettings) -> list[NewTopic]:
    def spec(name: str, config: dict[str, str]) -> NewTopic:
        return NewTopic(
            name,
            num_partitions=topics.partitions,
            replication_factor=topics.replication_factor,
            config=config,
        )

    return [
        # Keyed by document_id and compacted: the latest upload per document is the
        # source of truth, and the whole index can be rebuilt from it.
        spec(
            topics.uploads,
            {
                "cleanup.policy": "compact",
                "delete.retention.ms": str(topics.uploads_delete_retention_ms),
                "min.compaction.lag.ms": "60000",
            },
        ),
        spec(topics.pages, {"max.message.bytes": str(topics.pages_max_message_bytes)}),
        spec(topics.vectors, {"max.message.bytes": str(topics.vectors_max_message_bytes)}),
        spec(topics.indexed, {"cleanup.policy": "compact"}),
        spec(topics.dlq, {"retention.ms": str(30 * 24 * 3600 * 1000)}),
    ]


def ensure_topics(settings: ColstreamSettings, timeout_s: float = 30.0) -> dict[str, str]:
    """Create the pipeline's topics; existing ones are left as they are. Idempotent."""
    admin = admin_client(settings)
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    outcome: dict[str, str] = {}
    wanted = [t for t in topic_specs(settings.topics) if t.topic not in existing]
    for t in topic_specs(settings.topics):
        if t.topic in existing:
            outcome[t.topic] = "exists"
    if wanted:
        for name, future in admin.create_topics(wanted, request_timeout=timeout_s).items():
            try:
                future.result(timeout=timeout_s)
                outcome[name] = "created"
            except KafkaException as exc:
                if exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    outcome[name] = "exists"
                else:
                    raise
    return outcome


def describe_topic_configs(settings: ColstreamSettings, names: Sequence[str]) -> dict[str, dict[str, str]]:
    admin = admin_client(settings)
    resources = [ConfigResource(ConfigResource.Type.TOPIC, n) for n in names]
    result: dict[str, dict[str, str]] = {}
    for res, future in admin.describe_configs(resources).items():
        entries = future.result(timeout=30)
        result[res.name] = {k: v.value for k, v in entries.items()}
    return result


def committed_offsets(
    settings: ColstreamSettings, group: str, topic: str, timeout_s: float = 10.0
) -> dict[int, tuple[int, int, int]]:
    """Per partition of ``topic``: (``group``'s committed offset or -1, low, high watermark).

    Asked through a consumer of ``group`` that never subscribes (so it never joins the
    group or moves its offsets), not the admin API: librdkafka's ListConsumerGroupOffsets
    crashes the process when the group's coordinator is not ready yet, as right after a
    broker restart (confluentinc/librdkafka#5040)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({**settings.kafka.common_config(), "group.id": group, "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s).topics[topic]
        if metadata.error is not None:
            raise RuntimeError(f"{topic}: {metadata.error.str()}")
        partitions = [TopicPartition(topic, p) for p in sorted(metadata.partitions)]
        found = {}
        for tp in consumer.committed(partitions, timeout=timeout_s):
            if tp.error is not None:
                raise RuntimeError(f"{topic} [{tp.partition}]: {tp.error.str()}")
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=timeout_s)
            found[tp.partition] = (tp.offset if tp.offset >= 0 else -1, low, high)
        return found
    finally:
        consumer.close()


def wait_for_groups_idle(settings: ColstreamSettings, groups: list[str], timeout_s: float) -> bool:
    """True once none of ``groups`` has a member (they are empty, dead or unknown)."""
    from confluent_kafka import ConsumerGroupState

    admin = admin_client(settings)
    deadline = time.monotonic() + timeout_s
    while True:
        busy = False
        for group, future in admin.describe_consumer_groups(groups, request_timeout=15).items():
            try:
                described = future.result(timeout=30)
            except Exception:
                continue  # not found: nobody is in it
            if described.members or described.state not in (ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD,
                                                             ConsumerGroupState.UNKNOWN):
                busy = True
                log.debug("group %s still has members", group)
        if not busy:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(2.0)
