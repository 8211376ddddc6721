"""The pure core of a zero-downtime model migration: state, transitions, progress.

A migration moves what the alias serves from the *source* index (the current
model) to a *target* index (the new model) while uploads, deletes and searches go on:

1. ``start``: the target index is created with records of its own, and a backfill
   pipeline (splitter, embedder and sink of the new model, in consumer groups of its
   own, over topics of its own) reads the compacted uploads topic from the
   beginning. It re-embeds every live document and then keeps following the topic,
   so new uploads and deletes reach both indexes: the serving pipeline writes the
   source, the backfill the target. Versions are upload offsets in both, so the two
   indexes converge to the same documents.
2. ``cutover``: once every live document of the source is settled in the target at
   the same or a newer version (:func:`measure_progress`), search switches to the
   target and its model, and the alias points at the target. Refused before that
   unless forced.
3. ``finish``: the source pipeline stops and the source index is dropped.
   ``abort`` (before or after cutover) serves the source again and drops the target.

Nothing here touches Kafka, Qdrant or threads: each transition returns the next
state and the :class:`Action` list an adapter carries out (the embedded runtime in
:mod:`colstream.migration.embedded`, the Kubernetes Jobs on a cluster). Every action
is idempotent, so an adapter that crashes halfway runs the same step again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from colstream.infra.settings import ColstreamSettings
from colstream.infra.vectorstore import IndexModel
from colstream.schemas.events import DocumentRecord

Phase = Literal["backfilling", "cut_over", "finished", "aborted"]
ACTIVE_PHASES: tuple[Phase, ...] = ("backfilling", "cut_over")
# Documents not yet done that status names, at most.
PENDING_SAMPLE = 10
BACKFILL_STAGES = ("splitter", "embedder", "sink")


class MigrationError(Exception):
    """A migration command that cannot run now; ``kind`` says why (the API's status code)."""

    STATUS = {"not_found": 404, "conflict": 409, "not_ready": 409, "invalid": 400}

    def __init__(self, kind: Literal["not_found", "conflict", "not_ready", "invalid"], message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    @property
    def status_code(self) -> int:
        return self.STATUS[self.kind]


@dataclass(frozen=True)
class IndexRef:
    """One index: its collection (or shard directory), its records collection, its model."""

    name: str
    records: str
    model: IndexModel

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "records": self.records, "model": self.model.as_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexRef:
        return cls(name=str(data["name"]), records=str(data["records"]), model=IndexModel.from_dict(data["model"]))


def target_records_name(records_collection: str, index: str) -> str:
    """The records collection of an index a migration creates."""
    return f"{records_collection}--{index}"


@dataclass(frozen=True)
class MigrationState:
    migration_id: str
    phase: Phase
    source: IndexRef
    target: IndexRef
    # What loads the target model: family, name_or_path, revision (ModelSettings fields).
    target_model: dict[str, Any]
    started_at: str
    cut_over_at: str | None = None
    ended_at: str | None = None
    forced_cutover: bool = False
    # Backfill topics and consumer groups already removed (after abort, or after finish once
    # the serving pipeline runs the new model).
    cleaned_up: bool = False

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE_PHASES

    @property
    def serving(self) -> IndexRef:
        """The index search answers from in this phase."""
        return self.target if self.phase in ("cut_over", "finished") else self.source

    def as_dict(self) -> dict[str, Any]:
        return {
            "migration_id": self.migration_id,
            "phase": self.phase,
            "source": self.source.as_dict(),
            "target": self.target.as_dict(),
            "target_model": dict(self.target_model),
            "started_at": self.started_at,
            "cut_over_at": self.cut_over_at,
            "ended_at": self.ended_at,
            "forced_cutover": self.forced_cutover,
            "cleaned_up": self.cleaned_up,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MigrationState:
        phase = data["phase"]
        if phase not in ("backfilling", "cut_over", "finished", "aborted"):
            raise ValueError(f"unknown migration phase {phase!r}")
        return cls(
            migration_id=str(data["migration_id"]),
            phase=phase,
            source=IndexRef.from_dict(data["source"]),
            target=IndexRef.from_dict(data["target"]),
            target_model=dict(data.get("target_model") or {}),
            started_at=str(data["started_at"]),
            cut_over_at=data.get("cut_over_at"),
            ended_at=data.get("ended_at"),
            forced_cutover=bool(data.get("forced_cutover", False)),
            cleaned_up=bool(data.get("cleaned_up", False)),
        )


# -- actions an adapter carries out, in order ------------------------------------------------
@dataclass(frozen=True)
class CreateIndex:
    index: IndexRef


@dataclass(frozen=True)
class StartBackfill:
    """Run the backfill pipeline of the new model into ``index`` (idempotent: resumes its groups)."""

    index: IndexRef


@dataclass(frozen=True)
class StopBackfill:
    pass


@dataclass(frozen=True)
class ServeIndex:
    """Search answers from ``index`` with its own model, and the alias points at it."""

    index: IndexRef


@dataclass(frozen=True)
class StopSourcePipeline:
    """The serving pipeline of the old model stops writing (its stages stop)."""


@dataclass(frozen=True)
class DropIndex:
    index: IndexRef


@dataclass(frozen=True)
class RemoveBackfillResources:
    """Delete the backfill's topics and consumer groups."""


Action = (
    CreateIndex | StartBackfill | StopBackfill | ServeIndex | StopSourcePipeline | DropIndex | RemoveBackfillResources
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def plan_start(
    current: MigrationState | None,
    *,
    migration_id: str,
    source: IndexRef,
    target: IndexRef,
    target_model: dict[str, Any],
    now: str | None = None,
) -> tuple[MigrationState, list[Action]]:
    if current is not None and current.active:
        raise MigrationError(
            "conflict",
            f"migration {current.migration_id} to {current.target.model.describe()} is {current.phase}; "
            "run `colstream migrate cutover`, `finish` or `abort` first",
        )
    if source.model.same_model(target.model):
        raise MigrationError("invalid", f"the index already belongs to {source.model.describe()}; nothing to migrate")
    if source.name == target.name:
        raise MigrationError("invalid", f"source and target are the same index {source.name!r}")
    state = MigrationState(
        migration_id=migration_id,
        phase="backfilling",
        source=source,
        target=target,
        target_model=dict(target_model),
        started_at=now or _now(),
    )
    return state, [CreateIndex(target), StartBackfill(target)]


def require(state: MigrationState | None) -> MigrationState:
    if state is None:
        raise MigrationError("not_found", "no migration has been started; run `colstream migrate start --family F`")
    return state


@dataclass(frozen=True)
class Progress:
    """How much of the source's live content the target holds."""

    documents_total: int
    documents_done: int
    pages_total: int
    pages_done: int
    # Some documents not yet done (for status), at most PENDING_SAMPLE.
    pending: tuple[str, ...] = ()
    # Documents the target holds that the source has not recorded yet (uploaded meanwhile).
    target_only: int = 0

    @property
    def complete(self) -> bool:
        return self.documents_done == self.documents_total and self.pages_done == self.pages_total

    def as_dict(self) -> dict[str, Any]:
        return {
            "documents": {"done": self.documents_done, "total": self.documents_total},
            "pages": {"done": self.pages_done, "total": self.pages_total},
            "complete": self.complete,
            "pending": list(self.pending),
            "target_only_documents": self.target_only,
        }


def _settled(record: DocumentRecord) -> bool:
    return record.state in ("complete", "partial", "failed", "deleted")


def _pages_settled(record: DocumentRecord) -> int:
    return len(set(record.indexed_pages) | set(record.failed_pages))


def measure_progress(source: Iterable[DocumentRecord], target: Iterable[DocumentRecord]) -> Progress:
    """Documents and pages of the source's live documents that the target has settled.

    A live source document (any state but deleted) is done when the target's record
    is settled at the same version, or at a newer one (a re-upload or a delete the
    backfill saw first). Its pages count as done as the target settles them.
    """
    by_id = {record.document_id: record for record in target}
    live = [record for record in source if record.state != "deleted"]
    documents_done = pages_total = pages_done = 0
    pending: list[str] = []
    for record in sorted(live, key=lambda r: r.document_id):
        total = record.total_pages or 0
        pages_total += total
        mirror = by_id.get(record.document_id)
        if mirror is not None and mirror.version > record.version and _settled(mirror):
            documents_done += 1
            pages_done += total
            continue
        if mirror is not None and mirror.version == record.version:
            pages_done += min(total, _pages_settled(mirror))
            if _settled(mirror):
                documents_done += 1
                continue
        if len(pending) < PENDING_SAMPLE:
            pending.append(record.document_id)
    known = {record.document_id for record in source}
    target_only = sum(1 for doc, rec in by_id.items() if doc not in known and rec.state != "deleted")
    return Progress(
        documents_total=len(live),
        documents_done=documents_done,
        pages_total=pages_total,
        pages_done=pages_done,
        pending=tuple(pending),
        target_only=target_only,
    )


def plan_cutover(
    state: MigrationState | None, progress: Progress, *, force: bool = False, now: str | None = None
) -> tuple[MigrationState, list[Action]]:
    state = require(state)
    if state.phase == "cut_over":
        return state, [ServeIndex(state.target)]  # repeated: serve it again, nothing else
    if state.phase != "backfilling":
        raise MigrationError("conflict", f"migration {state.migration_id} is {state.phase}; nothing to cut over")
    if not progress.complete and not force:
        raise MigrationError(
            "not_ready",
            f"backfill not complete: {progress.documents_done}/{progress.documents_total} documents, "
            f"{progress.pages_done}/{progress.pages_total} pages; wait (`colstream migrate status`) "
            "or pass --force to serve the new index with what it holds now",
        )
    cut = replace(state, phase="cut_over", cut_over_at=now or _now(), forced_cutover=not progress.complete)
    return cut, [ServeIndex(state.target)]


def plan_finish(state: MigrationState | None, *, now: str | None = None) -> tuple[MigrationState, list[Action]]:
    state = require(state)
    if state.phase == "finished":
        return state, []
    if state.phase != "cut_over":
        raise MigrationError(
            "conflict",
            f"migration {state.migration_id} is {state.phase}; finish drops the old index and needs a cutover first",
        )
    # The backfill pipeline keeps writing the new index until the serving pipeline runs the
    # new model (the next start with the new model settings); see plan_resume.
    return replace(state, phase="finished", ended_at=now or _now()), [StopSourcePipeline(), DropIndex(state.source)]


def plan_abort(state: MigrationState | None, *, now: str | None = None) -> tuple[MigrationState, list[Action]]:
    state = require(state)
    if state.phase == "aborted":
        return state, []
    if state.phase == "finished":
        raise MigrationError(
            "conflict",
            f"migration {state.migration_id} is finished: the old index is gone; start a migration back instead",
        )
    actions: list[Action] = []
    if state.phase == "cut_over":
        actions.append(ServeIndex(state.source))
    actions += [StopBackfill(), DropIndex(state.target), RemoveBackfillResources()]
    return replace(state, phase="aborted", ended_at=now or _now(), cleaned_up=True), actions


def plan_resume(state: MigrationState | None, serving_model: IndexModel) -> tuple[MigrationState | None, list[Action]]:
    """What a restarted process does about a migration it finds; ``serving_model`` is the model
    its own settings name."""
    if state is None:
        return None, []
    if state.phase == "backfilling":
        return state, [StartBackfill(state.target)]
    if state.phase == "cut_over":
        return state, [StartBackfill(state.target), ServeIndex(state.target)]
    if state.phase == "finished" and not state.cleaned_up:
        if serving_model.same_model(state.target.model):
            # The serving pipeline runs the new model now: the backfill pipeline is not needed.
            return replace(state, cleaned_up=True), [RemoveBackfillResources()]
        # Still configured for the old model (the sink refuses the alias): keep the new index fed.
        return state, [StartBackfill(state.target)]
    return state, []


def pipeline_index(state: MigrationState | None) -> IndexRef | None:
    """The index the serving pipeline must write while a migration is active (pinned, not
    through the alias, which moves at cutover); None: follow the alias."""
    return state.source if state is not None and state.active else None


def serving_index_for(state: MigrationState | None, model: IndexModel) -> IndexRef | None:
    """The index a serving stage of ``model`` writes while a migration is active, pinned by
    name: the source for the old model, the target for the new one (stages rolled to the new
    model after a cutover, before ``finish``). None: follow the alias, where a stage of any
    other model is refused before it writes."""
    if state is None or not state.active:
        return None
    if model.same_model(state.source.model):
        return state.source
    if model.same_model(state.target.model):
        return state.target
    return None


# -- the backfill pipeline's settings ---------------------------------------------------------
def backfill_settings(settings: ColstreamSettings, state: MigrationState) -> ColstreamSettings:
    """The serving settings with the new model, consumer groups of the migration's own (so it
    reads the uploads topic from the beginning while the serving groups keep their offsets)
    and pages/vectors/indexed topics of its own (its completion events never reach the
    webhooks; the serving pipeline's do)."""
    topics = settings.topics
    suffix = f"migrate-{state.migration_id}"
    return settings.updated(
        model=dict(state.target_model),
        consumer_group_prefix=f"{settings.consumer_group_prefix}{suffix}-",
        topics={
            "pages": f"{topics.pages}.{suffix}",
            "vectors": f"{topics.vectors}.{suffix}",
            "indexed": f"{topics.indexed}.{suffix}",
        },
    )


def backfill_topics(settings: ColstreamSettings, state: MigrationState) -> list[str]:
    derived = backfill_settings(settings, state).topics
    return [derived.pages, derived.vectors, derived.indexed]


def backfill_groups(settings: ColstreamSettings, state: MigrationState) -> list[str]:
    prefix = backfill_settings(settings, state).consumer_group_prefix
    return [f"{prefix}{stage}" for stage in BACKFILL_STAGES]


# -- where the state lives ---------------------------------------------------------------------
class StateStore(Protocol):
    def load(self) -> MigrationState | None: ...

    def save(self, state: MigrationState) -> None: ...


@dataclass
class FileStateStore:
    """The state as one JSON file, replaced atomically (the embedded store's directory)."""

    path: Path

    def load(self) -> MigrationState | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        return MigrationState.from_dict(data)

    def save(self, state: MigrationState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        with temporary.open("w") as handle:
            json.dump(state.as_dict(), handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)


MIGRATION_STATE_FILE = "colstream_migration.json"


def state_file(settings: ColstreamSettings) -> Path:
    return Path(settings.qdrant.path) / MIGRATION_STATE_FILE


def describe_actions(actions: Sequence[Action]) -> list[str]:
    return [type(action).__name__ for action in actions]
