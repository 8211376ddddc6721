"""Operator commands: read and redrive dead letters, rewind a stage's consumer group."""

from __future__ import annotations

import argparse
import json
import uuid
from datetime import datetime
from typing import Any

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from colstream.app import load_settings, resolve_broker
from colstream.infra.dead_letters import dead_letters
from colstream.infra.dead_letters import redrive as redrive_letters
from colstream.infra.settings import ColstreamSettings
from colstream.schemas import DeadLetter

STAGE_INPUT = {"splitter": "uploads", "embedder": "pages", "sink": "vectors"}


def register(sub: Any) -> None:
    dlq = sub.add_parser("dlq", help="dead letters: list them, redrive them once the cause is fixed")
    dlq_sub = dlq.add_subparsers(dest="action", required=True)
    ls = dlq_sub.add_parser("list")
    ls.add_argument("--json", action="store_true")
    _add_selectors(ls)
    rd = dlq_sub.add_parser("redrive", help="send chosen dead letters back to their stage's input topic")
    _add_selectors(rd)
    rd.add_argument("--all", action="store_true", help="every dead letter (after the filters)")
    rd.add_argument("--dry-run", action="store_true")
    rd.add_argument("--force", action="store_true",
                    help="redrive even when the document already has a newer version")
    dlq.set_defaults(func=cmd_dlq)

    replay = sub.add_parser("replay", help="rewind a stage's consumer group (stop the stage first)")
    replay.add_argument("--stage", choices=sorted(STAGE_INPUT), default="splitter")
    when = replay.add_mutually_exclusive_group(required=True)
    when.add_argument("--from-beginning", action="store_true")
    when.add_argument("--from", dest="from_ts", help="ISO timestamp, e.g. 2026-11-26T09:00:00Z")
    replay.set_defaults(func=cmd_replay)


def _add_selectors(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--offset", action="append", default=[], help="PARTITION:OFFSET of a dead letter")
    parser.add_argument("--stage")
    parser.add_argument("--error-type")
    parser.add_argument("--document-id")


def cmd_dlq(args: argparse.Namespace) -> int:
    settings = resolve_broker(load_settings(), start=False)
    letters = dead_letters(settings, args)
    if args.action == "list":
        if args.json:
            print(json.dumps([{"dlq_offset": w, **json.loads(letter.model_dump_json(exclude={"original_value"}))}
                              for w, letter in letters], indent=2))
            return 0
        for where, letter in letters:
            doc = letter.document_id or letter.original_key or "-"
            page = f" page {letter.page_number}" if letter.page_number else ""
            print(f"[{where}] {letter.failed_at:%Y-%m-%d %H:%M:%S} {letter.stage:<8} {letter.error_type:<24} "
                  f"{doc}{page} (from {letter.source_topic}@{letter.source_partition}/{letter.source_offset})\n"
                  f"    {letter.message}")
        print(f"{len(letters)} dead letters")
        return 0
    if not (args.all or args.offset or args.stage or args.error_type or args.document_id):
        print("choose dead letters with --offset/--stage/--error-type/--document-id, or pass --all")
        return 2
    return redrive(settings, letters, dry_run=args.dry_run, force=args.force)


def redrive(settings: ColstreamSettings, letters: list[tuple[str, DeadLetter]], *, dry_run: bool,
            force: bool) -> int:
    current = {} if force else _current_versions(settings, {letter.document_id for _, letter in letters})
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


def cmd_replay(args: argparse.Namespace) -> int:
    settings = resolve_broker(load_settings(), start=False)
    topic = getattr(settings.topics, STAGE_INPUT[args.stage])
    group = f"{settings.consumer_group_prefix}{args.stage}"
    ts_ms = None
    if args.from_ts:
        ts_ms = int(datetime.fromisoformat(args.from_ts.replace("Z", "+00:00")).timestamp() * 1000)
    targets = rewind_offsets(settings, group, topic, ts_ms)
    admin = AdminClient(settings.kafka.common_config())
    future = admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, targets)])[group]
    future.result(timeout=30)
    for tp in targets:
        print(f"{group}: {tp.topic}[{tp.partition}] -> offset {tp.offset}")
    print("rewound; start the stage again to rebuild (writes are idempotent and latest-wins)")
    return 0
