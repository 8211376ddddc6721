"""Operator commands: read and redrive dead letters, rewind a stage's consumer group."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated

import typer
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from colstream.cli.common import connect, fail, spinner
from colstream.infra.dead_letters import READER_GROUP_PREFIX, Selection, dead_letters
from colstream.infra.dead_letters import redrive as redrive_letters
from colstream.infra.settings import ColstreamSettings
from colstream.schemas import DeadLetter

STAGE_INPUT = {"splitter": "uploads", "embedder": "pages", "sink": "vectors"}


def register(app: typer.Typer) -> None:
    dlq = typer.Typer(help="dead letters: list them, redrive them once the cause is fixed", no_args_is_help=True)
    app.add_typer(dlq, name="dlq")
    dlq.command("list")(dlq_list)
    dlq.command("redrive")(dlq_redrive)
    app.command("replay")(replay)


Offsets = Annotated[list[str] | None, typer.Option("--offset", help="PARTITION:OFFSET of a dead letter (repeatable)")]
StageOpt = Annotated[str | None, typer.Option("--stage", help="only dead letters of this stage")]
ErrorType = Annotated[str | None, typer.Option("--error-type", help="only this error type, e.g. EncryptedDocument")]
DocumentId = Annotated[str | None, typer.Option("--document-id", help="only this document's dead letters")]


def _letters(settings: ColstreamSettings, selection: Selection) -> list[tuple[str, DeadLetter]]:
    from colstream.infra.kafka_check import BrokerProblem, check_topic_access

    try:
        check_topic_access(settings, settings.topics.dlq, "Read")
    except BrokerProblem as exc:
        fail(str(exc))
    from confluent_kafka import KafkaException

    from colstream.infra.kafka_check import explain

    try:
        with spinner(f"reading dead letters from {settings.topics.dlq}"):
            return dead_letters(settings, selection)
    except KafkaException as exc:
        fail(explain(settings, exc.args[0], resource="topic", name=settings.topics.dlq, operation="Read",
                     group=READER_GROUP_PREFIX))


def dlq_list(
    offset: Offsets = None, stage: StageOpt = None, error_type: ErrorType = None, document_id: DocumentId = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of lines")] = False,
) -> None:
    """List dead letters (newest last), with why each record failed."""
    settings = connect()
    letters = _letters(settings, Selection(tuple(offset or ()), stage, error_type, document_id))
    if as_json:
        print(json.dumps([{"dlq_offset": w, **json.loads(letter.model_dump_json(exclude={"original_value"}))}
                          for w, letter in letters], indent=2))
        return
    for where, letter in letters:
        doc = letter.document_id or letter.original_key or "-"
        page = f" page {letter.page_number}" if letter.page_number else ""
        print(f"[{where}] {letter.failed_at:%Y-%m-%d %H:%M:%S} {letter.stage:<8} {letter.error_type:<24} "
              f"{doc}{page} (from {letter.source_topic}@{letter.source_partition}/{letter.source_offset})\n"
              f"    {letter.message}")
    print(f"{len(letters)} dead letters")


def dlq_redrive(
    offset: Offsets = None, stage: StageOpt = None, error_type: ErrorType = None, document_id: DocumentId = None,
    all_: Annotated[bool, typer.Option("--all", help="every dead letter (after the filters)")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show what would be redriven; send nothing")] = False,
    force: Annotated[bool, typer.Option("--force", help="redrive even when the document already has a newer version")]
    = False,
) -> None:
    """Send chosen dead letters back to their stage's input topic."""
    if not (all_ or offset or stage or error_type or document_id):
        print("choose dead letters with --offset/--stage/--error-type/--document-id, or pass --all")
        raise typer.Exit(2)
    settings = connect()
    letters = _letters(settings, Selection(tuple(offset or ()), stage, error_type, document_id))
    raise typer.Exit(redrive(settings, letters, dry_run=dry_run, force=force))


def redrive(settings: ColstreamSettings, letters: list[tuple[str, DeadLetter]], *, dry_run: bool,
            force: bool) -> int:
    current = {} if force else _current_versions(settings, {letter.document_id for _, letter in letters})
    with spinner(f"{'planning' if dry_run else 'redriving'} {len(letters)} dead letters"):
        outcomes = redrive_letters(settings, letters, current, dry_run=dry_run)
    for outcome in outcomes:
        letter = outcome.letter
        if outcome.action == "skipped":
            print(f"[{outcome.where}] skipped: {outcome.reason}")
        else:
            print(f"[{outcome.where}] {'would redrive' if dry_run else 'redrive'} -> {letter.source_topic} "
                  f"key={letter.original_key}")
    sent = sum(1 for outcome in outcomes if outcome.action != "skipped")
    print(f"{sent} records {'selected' if dry_run else 'redriven'}")
    return 0


def _current_versions(settings: ColstreamSettings, document_ids: set[str | None]) -> dict[str, int]:
    from colstream.cli.main import list_documents

    ids = {d for d in document_ids if d}
    if not ids:
        return {}
    return {row["document_id"]: int(row["version"]) for row in list_documents(settings)
            if row["document_id"] in ids and row.get("version") is not None}


def rewind_offsets(settings: ColstreamSettings, group: str, topic: str,
                   from_ts_ms: int | None) -> list[TopicPartition]:
    """Offsets at the start of ``topic`` (or at a timestamp) for every partition."""
    consumer = Consumer({**settings.kafka.common_config(), "group.id": f"colstream-rewind-{uuid.uuid4()}",
                         "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        targets: list[TopicPartition] = []
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if from_ts_ms is None:
                targets.append(TopicPartition(topic, p, low))
                continue
            found = consumer.offsets_for_times([TopicPartition(topic, p, from_ts_ms)], timeout=10)[0]
            targets.append(TopicPartition(topic, p, found.offset if found.offset >= 0 else high))
        return targets
    finally:
        consumer.close()


class Stage(StrEnum):
    splitter = "splitter"
    embedder = "embedder"
    sink = "sink"


def replay(
    stage: Annotated[Stage, typer.Option("--stage", help="whose consumer group to rewind")] = Stage.splitter,
    from_beginning: Annotated[bool, typer.Option("--from-beginning", help="rewind to the start of the topic")]
    = False,
    from_ts: Annotated[str | None, typer.Option("--from", help="rewind to an ISO timestamp, e.g. 2026-11-26T09:00:00Z")]
    = None,
) -> None:
    """Rewind a stage's consumer group (stop the stage first); its restart rebuilds from there."""
    if from_beginning == (from_ts is not None):
        fail("give exactly one of --from-beginning or --from TIMESTAMP", code=2)
    settings = connect()
    topic = getattr(settings.topics, STAGE_INPUT[stage.value])
    group = f"{settings.consumer_group_prefix}{stage.value}"
    ts_ms = None
    if from_ts:
        try:
            ts_ms = int(datetime.fromisoformat(from_ts.replace("Z", "+00:00")).timestamp() * 1000)
        except ValueError:
            fail(f"--from {from_ts!r} is not an ISO timestamp", code=2)
    with spinner(f"rewinding {group} on {topic}"):
        targets = rewind_offsets(settings, group, topic, ts_ms)
        admin = AdminClient(settings.kafka.common_config())
        future = admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, targets)])[group]
        future.result(timeout=30)
    for tp in targets:
        print(f"{group}: {tp.topic}[{tp.partition}] -> offset {tp.offset}")
    print("rewound; start the stage again to rebuild (writes are idempotent and latest-wins)")
