"""Reading and redriving dead letters: shared by ``colstream dlq`` and the API's console routes.

Dead letters live on the DLQ topic; nothing else stores them. Reading never
joins a consumer group (a reader must not steal partitions from anyone), and a
redrive sends the original record back to the topic it came from, once per
source record, unless the document has moved on to a newer version since.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from colstream.infra.kafka import OutRecord, ProducerClient
from colstream.infra.settings import ColstreamSettings
from colstream.schemas import DeadLetter

TopicRow = tuple[int, int, bytes | None, bytes | None]
# Readers never join their group, but the client still looks its coordinator up: a
# principal that reads dead letters needs Describe on groups with this prefix.
READER_GROUP_PREFIX = "colstream-reader-"
_REFUSED = frozenset({KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED,
                      KafkaError._AUTHENTICATION})


class DeadLetterSelector(Protocol):
    """Which dead letters to take; ``argparse`` namespaces of ``colstream dlq`` have this shape."""

    @property
    def offset(self) -> Sequence[str]: ...

    @property
    def stage(self) -> str | None: ...

    @property
    def error_type(self) -> str | None: ...

    @property
    def document_id(self) -> str | None: ...


@dataclass(frozen=True)
class Selection:
    offset: Sequence[str] = ()
    stage: str | None = None
    error_type: str | None = None
    document_id: str | None = None


def read_topic(settings: ColstreamSettings, topic: str, *, last_per_partition: int | None = None,
               idle_timeout_s: float = 30.0) -> list[TopicRow]:
    """Records currently on ``topic`` (the newest ``last_per_partition`` of each partition
    when given), read without joining a group. An error the broker will not get over
    (no Read ACL) raises at once, and ``idle_timeout_s`` without a record raises
    :class:`TimeoutError`: a reader never spins."""
    consumer = Consumer({**settings.kafka.common_config(), "group.id": f"{READER_GROUP_PREFIX}{uuid.uuid4()}",
                         "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        if meta.error is not None:
            raise KafkaException(meta.error)  # missing, or not ours to describe: never "no records"
        ends: dict[int, int] = {}
        assignment = []
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if last_per_partition is not None:
                low = max(low, high - last_per_partition)
            if high > low:
                ends[p] = high
                assignment.append(TopicPartition(topic, p, low))
        consumer.assign(assignment)
        rows: list[TopicRow] = []
        idle_deadline = time.monotonic() + idle_timeout_s
        while ends:
            msg = consumer.poll(1.0)
            if msg is None:
                if time.monotonic() > idle_deadline:
                    raise TimeoutError(f"{topic}: no records for {idle_timeout_s:.0f}s while "
                                       f"{sum(ends.values())} were expected; is the broker reachable?")
                continue
            err = msg.error()
            if err is not None:
                if err.fatal() or not err.retriable() or err.code() in _REFUSED:
                    raise KafkaException(err)  # an ACL refusal, say: never spin on it
                continue
            idle_deadline = time.monotonic() + idle_timeout_s
            partition, offset = int(msg.partition() or 0), int(msg.offset() or 0)
            rows.append((partition, offset, msg.key(), msg.value()))
            if offset + 1 >= ends.get(partition, 0):
                ends.pop(partition, None)
        return rows
    finally:
        consumer.close()


def select(rows: Sequence[TopicRow], selector: DeadLetterSelector) -> list[tuple[str, DeadLetter]]:
    """Dead letters among ``rows`` that ``selector`` picks, as ``("partition:offset", letter)``."""
    wanted_offsets = set(selector.offset)
    letters = []
    for partition, offset, _key, value in rows:
        if value is None:
            continue
        letter = DeadLetter.model_validate_json(value)
        where = f"{partition}:{offset}"
        if wanted_offsets and where not in wanted_offsets:
            continue
        if selector.stage and letter.stage != selector.stage:
            continue
        if selector.error_type and letter.error_type != selector.error_type:
            continue
        if selector.document_id and letter.document_id != selector.document_id:
            continue
        letters.append((where, letter))
    return letters


def dead_letters(
    settings: ColstreamSettings, selector: DeadLetterSelector, *, last_per_partition: int | None = None
) -> list[tuple[str, DeadLetter]]:
    return select(read_topic(settings, settings.topics.dlq, last_per_partition=last_per_partition), selector)


def letters_at(settings: ColstreamSettings, positions: Sequence[str], timeout_s: float = 10.0
               ) -> list[tuple[str, DeadLetter]]:
    """The dead letters at ``PARTITION:OFFSET`` positions; a position holding nothing is left out."""
    topic = settings.topics.dlq
    consumer = Consumer({**settings.kafka.common_config(), "group.id": f"{READER_GROUP_PREFIX}{uuid.uuid4()}",
                         "enable.auto.commit": False})
    found: list[tuple[str, DeadLetter]] = []
    try:
        for where in dict.fromkeys(positions):
            partition, offset = (int(part) for part in where.split(":", 1))
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            if not low <= offset < high:
                continue
            consumer.assign([TopicPartition(topic, partition, offset)])
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                msg = consumer.poll(1.0)
                if msg is None or msg.error():
                    continue
                value = msg.value()
                if msg.partition() == partition and msg.offset() == offset and value is not None:
                    found.append((where, DeadLetter.model_validate_json(value)))
                break
        return found
    finally:
        consumer.close()


@dataclass(frozen=True)
class RedriveOutcome:
    where: str
    letter: DeadLetter
    action: Literal["redriven", "would redrive", "skipped"]
    reason: str | None = None


def plan_redrive(
    letters: Sequence[tuple[str, DeadLetter]], current_versions: Mapping[str, int]
) -> list[RedriveOutcome]:
    """What a redrive does with each letter: the source record goes back once, unless the
    document already has a newer version (``current_versions``, empty to force)."""
    outcomes: list[RedriveOutcome] = []
    sent: set[tuple[str, int | None, int | None]] = set()
    for where, letter in letters:
        source = (letter.source_topic, letter.source_partition, letter.source_offset)
        if source in sent:
            continue  # several pages of one upload failed: the upload goes back once
        newer = current_versions.get(letter.document_id or "")
        if newer is not None and letter.version is not None and newer > letter.version:
            outcomes.append(RedriveOutcome(where, letter, "skipped",
                                           f"{letter.document_id} already has a newer version {newer}"))
            continue
        outcomes.append(RedriveOutcome(where, letter, "redriven"))
        sent.add(source)
    return outcomes


def redrive(
    settings: ColstreamSettings,
    letters: Sequence[tuple[str, DeadLetter]],
    current_versions: Mapping[str, int],
    *,
    dry_run: bool = False,
) -> list[RedriveOutcome]:
    """Send the chosen letters' original records back to their source topics."""
    outcomes = plan_redrive(letters, current_versions)
    if dry_run:
        return [RedriveOutcome(o.where, o.letter, "would redrive") if o.action == "redriven" else o
                for o in outcomes]
    producer = ProducerClient(settings)
    try:
        for outcome in outcomes:
            if outcome.action == "redriven":
                letter = outcome.letter
                producer.send(OutRecord(letter.source_topic, letter.original_key, letter.original_value_bytes()))
        producer.flush_or_raise()
    finally:
        producer.close()
    return outcomes
