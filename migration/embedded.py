"""The migration inside ``colstream run all``: the embedded store's adapter of the core.

The Edge store belongs to one process, so the process that runs the pipeline runs
the migration too, and ``colstream migrate`` reaches it through the API's admin
routes (:mod:`colstream.api.migration`):

* the backfill is a second splitter, embedder and sink in threads of this process,
  built by the composition root (:func:`colstream.app.build_stage`) from
  :func:`~colstream.migration.core.backfill_settings`: the new model, consumer groups
  and topics of the migration's own, and a store pinned to the target index;
* the serving pipeline keeps writing the source index, pinned by name
  (:func:`colstream.app.start_pipeline` reads the state), so both indexes follow
  every upload and delete;
* at cutover the API swaps its (store, model) pair in one assignment
  (:meth:`colstream.api.app.ApiContext.switch_serving`): no restart, and a search
  never mixes two models.

The state is a JSON file beside the shards (:func:`~colstream.migration.core.state_file`);
a restarted ``run all`` resumes what it says (:func:`~colstream.migration.core.plan_resume`).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from colstream.infra.settings import ColstreamSettings, ModelSettings, QdrantSettings
from colstream.infra.vectorstore import IndexModel, VectorStore, index_collection_name
from colstream.migration.core import (
    BACKFILL_STAGES,
    Action,
    CreateIndex,
    DropIndex,
    FileStateStore,
    IndexRef,
    MigrationError,
    MigrationState,
    Progress,
    RemoveBackfillResources,
    ServeIndex,
    StartBackfill,
    StateStore,
    StopBackfill,
    StopSourcePipeline,
    backfill_groups,
    backfill_settings,
    backfill_topics,
    measure_progress,
    plan_abort,
    plan_cutover,
    plan_finish,
    plan_resume,
    plan_start,
    require,
    state_file,
    target_records_name,
)

if TYPE_CHECKING:
    from colstream.app import Pipeline, StageThreads
    from colstream.infra.stage_runner import StageRunner

log = logging.getLogger(__name__)

SwitchServing = Callable[[Any, ModelSettings], None]
# Serving stages the source pipeline stops at finish (webhooks keep running).
SOURCE_WRITERS = ("splitter", "embedder", "sink")


class IndexAdmin(Protocol):
    def open(self, index: IndexRef) -> VectorStore:
        """A store pinned to ``index`` (created on its first ``ensure_collections``)."""

    def point_alias(self, index: IndexRef) -> None: ...

    def drop(self, index: IndexRef) -> None:
        """Remove the index and its records; its store is closed."""

    def exists(self, index: IndexRef) -> bool: ...


class EdgeIndexAdmin:
    def __init__(self, qdrant: QdrantSettings) -> None:
        self.qdrant = qdrant

    def open(self, index: IndexRef) -> VectorStore:
        from colstream.infra.vectorstore_edge import EdgeVectorStore

        return EdgeVectorStore(self.qdrant, index=index.name, records=index.records)

    def point_alias(self, index: IndexRef) -> None:
        from colstream.infra.vectorstore_edge import point_alias

        point_alias(self.qdrant, index.name)

    def drop(self, index: IndexRef) -> None:
        from colstream.infra.vectorstore_edge import drop_index

        drop_index(self.qdrant, index.name, index.records)

    def exists(self, index: IndexRef) -> bool:
        from colstream.infra.vectorstore_edge import index_exists

        return index_exists(self.qdrant, index.name)


class QdrantIndexAdmin:
    """The same on a Qdrant server: a collection per index, a real alias switched in one request."""

    def __init__(self, qdrant: QdrantSettings, client_factory: Callable[[], Any] | None = None) -> None:
        self.qdrant = qdrant
        self._client_factory = client_factory or self._client

    def _client(self) -> Any:
        from colstream.infra.vectorstore_qdrant import server_client

        return server_client(self.qdrant, timeout_s=120)

    def open(self, index: IndexRef) -> VectorStore:
        from colstream.infra.vectorstore_qdrant import QdrantServerVectorStore

        return QdrantServerVectorStore(self.qdrant, self._client_factory(), index=index.name, records=index.records)

    def point_alias(self, index: IndexRef) -> None:
        from colstream.infra.vectorstore_qdrant import point_alias

        client = self._client_factory()
        try:
            point_alias(client, self.qdrant.collection, index.name)
        finally:
            client.close()

    def drop(self, index: IndexRef) -> None:
        from colstream.infra.vectorstore_qdrant import drop_index

        client = self._client_factory()
        try:
            drop_index(client, self.qdrant.collection, index.name, index.records)
        finally:
            client.close()

    def exists(self, index: IndexRef) -> bool:
        client = self._client_factory()
        try:
            return bool(client.collection_exists(index.name))
        finally:
            client.close()


def index_admin(qdrant: QdrantSettings) -> IndexAdmin:
    return QdrantIndexAdmin(qdrant) if qdrant.url else EdgeIndexAdmin(qdrant)


class BackfillKafka(Protocol):
    def ensure_topics(self, settings: ColstreamSettings) -> None: ...

    def remove(self, settings: ColstreamSettings, topics: list[str], groups: list[str]) -> None: ...

    def wait_idle(self, settings: ColstreamSettings, groups: list[str], timeout_s: float) -> bool:
        """True once no consumer of ``groups`` is left (a backfill in another pod has stopped)."""


class KafkaBackfillResources:
    """The backfill's topics (created with the pipeline's configs) and consumer groups."""

    def ensure_topics(self, settings: ColstreamSettings) -> None:
        from colstream.infra.kafka import ensure_topics

        ensure_topics(settings)

    def remove(self, settings: ColstreamSettings, topics: list[str], groups: list[str]) -> None:
        from colstream.infra.kafka import admin_client

        admin = admin_client(settings)
        try:
            for future in admin.delete_topics(topics, operation_timeout=30).values():
                future.result(timeout=60)
            for future in admin.delete_consumer_groups(groups, request_timeout=30).values():
                future.result(timeout=60)
        except Exception as exc:  # leftovers cost disk, nothing else: say so and go on
            log.warning("removing the backfill's topics %s and groups %s: %s", topics, groups, exc)

    def wait_idle(self, settings: ColstreamSettings, groups: list[str], timeout_s: float) -> bool:
        from colstream.infra.kafka import wait_for_groups_idle

        return wait_for_groups_idle(settings, groups, timeout_s)


def _index_model_for(model: ModelSettings) -> IndexModel:
    from colstream.embedding.profile import index_model_for

    return index_model_for(model)


def index_ref(store: Any, fallback_records: str) -> IndexRef:
    model = store.index_model()
    if model is None:
        raise MigrationError("invalid", "the serving index does not exist yet; nothing to migrate")
    return IndexRef(name=str(store.index_name), records=str(getattr(store, "records_name", fallback_records)),
                    model=model)


def target_model_settings(
    settings: ColstreamSettings, family: str, name_or_path: str | None, revision: str | None, tiny_model: bool
) -> ModelSettings:
    """The serving model settings with the new family and checkpoint (validated)."""
    model = ModelSettings.model_validate(
        {**settings.model.model_dump(), "family": family, "name_or_path": name_or_path, "revision": revision}
    )
    if tiny_model:
        from colstream.embedding.tiny import ensure_tiny_checkpoint

        path = ensure_tiny_checkpoint(model.family, settings.state_dir / "models")
        model = model.model_copy(update={"name_or_path": str(path), "revision": None})
    return model


def plan_new_migration(
    settings: ColstreamSettings,
    current: MigrationState | None,
    serving: VectorStore,
    model_settings: ModelSettings,
    target_model: IndexModel,
) -> tuple[MigrationState, list[Action]]:
    """The core's ``start`` from what an adapter has: the index ``serving`` (the source) and the
    new model, whose index is named by the model beside the alias, with records of its own."""
    source = index_ref(serving, settings.qdrant.records_collection)
    name = index_collection_name(settings.qdrant.collection, target_model)
    target = IndexRef(name=name, records=target_records_name(settings.qdrant.records_collection, name),
                      model=target_model)
    return plan_start(
        current,
        migration_id=uuid.uuid4().hex[:8],
        source=source,
        target=target,
        target_model={"family": model_settings.family, "name_or_path": model_settings.name_or_path,
                      "revision": model_settings.revision},
    )


class EmbeddedMigrations:
    """Carries out the core's actions on the pipeline of this process."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        state_store: StateStore | None = None,
        admin: IndexAdmin | None = None,
        build_stage: Callable[[str, ColstreamSettings, VectorStore], StageRunner] | None = None,
        kafka: BackfillKafka | None = None,
        model_identity: Callable[[ModelSettings], IndexModel] = _index_model_for,
    ) -> None:
        self.pipeline = pipeline
        self.settings = pipeline.settings
        self.state_store = state_store or FileStateStore(state_file(self.settings))
        self.admin = admin or index_admin(self.settings.qdrant)
        self._build_stage = build_stage
        self.kafka = kafka or KafkaBackfillResources()
        self._identity = model_identity
        self._lock = threading.RLock()
        self._switch: SwitchServing | None = None
        self._pending_serve: IndexRef | None = None
        self._source_store: VectorStore | None = pipeline.store
        self._target_store: VectorStore | None = None
        self._backfill: StageThreads | None = None

    # -- wiring ------------------------------------------------------------------------
    def attach_api(self, switch: SwitchServing) -> None:
        """The API's serving switch; a cutover found on resume is applied now."""
        with self._lock:
            self._switch = switch
            pending, self._pending_serve = self._pending_serve, None
            state = self.state_store.load()
            if pending is not None and state is not None:
                self._serve(state, pending)

    def resume(self) -> None:
        """What a restarted ``run all`` does about the migration it finds."""
        with self._lock:
            state = self.state_store.load()
            if state is None:
                return
            resumed, actions = plan_resume(state, self._identity(self.settings.model))
            if actions:
                log.info("migration %s (%s): resuming: %s", state.migration_id, state.phase,
                         ", ".join(type(a).__name__ for a in actions))
            assert resumed is not None
            self._carry_out(resumed, actions)
            self.state_store.save(resumed)

    def close(self) -> None:
        with self._lock:
            self._stop_backfill()

    # -- commands ----------------------------------------------------------------------
    def start(self, family: str, name_or_path: str | None, revision: str | None, tiny_model: bool) -> dict[str, Any]:
        with self._lock:
            if self._source_store is None:
                raise MigrationError("conflict", "the serving index was dropped by the last migration; restart first")
            model_settings = target_model_settings(self.settings, family, name_or_path, revision, tiny_model)
            state, actions = plan_new_migration(self.settings, self.state_store.load(), self._source_store,
                                                model_settings, self._identity(model_settings))
            target = state.target
            self.state_store.save(state)
            self._carry_out(state, actions)
            log.info("migration %s: backfilling %s from %s", state.migration_id, target.name,
                     self.settings.topics.uploads)
            return self._status(state)

    def status(self, document_id: str | None = None) -> dict[str, Any]:
        with self._lock:
            return self._status(require(self.state_store.load()), document_id)

    def cutover(self, force: bool = False) -> dict[str, Any]:
        with self._lock:
            state = require(self.state_store.load())
            progress = self._progress(state) if state.phase == "backfilling" else Progress(0, 0, 0, 0)
            cut, actions = plan_cutover(state, progress, force=force)
            self._carry_out(cut, actions)
            self.state_store.save(cut)
            log.info("migration %s: search serves %s (%s)", cut.migration_id, cut.target.name,
                     cut.target.model.describe())
            return self._status(cut)

    def finish(self) -> dict[str, Any]:
        with self._lock:
            done, actions = plan_finish(self.state_store.load())
            self._carry_out(done, actions)
            self.state_store.save(done)
            return self._status(done)

    def abort(self) -> dict[str, Any]:
        with self._lock:
            aborted, actions = plan_abort(self.state_store.load())
            self._carry_out(aborted, actions)
            self.state_store.save(aborted)
            return self._status(aborted)

    # -- actions -----------------------------------------------------------------------
    def _carry_out(self, state: MigrationState, actions: Sequence[Action]) -> None:
        for action in actions:
            if isinstance(action, CreateIndex):
                self._open_target(state).ensure_collections(model=action.index.model)
            elif isinstance(action, StartBackfill):
                self._start_backfill(state)
            elif isinstance(action, StopBackfill):
                self._stop_backfill()
            elif isinstance(action, ServeIndex):
                self._serve(state, action.index)
            elif isinstance(action, StopSourcePipeline):
                self._stop_source_pipeline()
            elif isinstance(action, DropIndex):
                self._drop(state, action.index)
            elif isinstance(action, RemoveBackfillResources):
                self._remove_backfill_resources(state)

    def _open_target(self, state: MigrationState) -> VectorStore:
        if self._target_store is None:
            self._target_store = self.admin.open(state.target)
        return self._target_store

    def _start_backfill(self, state: MigrationState) -> None:
        if self._backfill is not None:
            return
        from colstream.app import StageThreads, build_stage

        derived = backfill_settings(self.settings, state)
        self.kafka.ensure_topics(derived)
        store = self._open_target(state)
        build = self._build_stage or build_stage
        threads = StageThreads()
        for name in BACKFILL_STAGES:
            runner = build(name, derived, store)  # type: ignore[arg-type]
            _keep_out_of_serving_health(runner, self.pipeline.stages)
            threads.start(f"backfill-{name}", runner)
        self._backfill = threads

    def _stop_backfill(self) -> None:
        if self._backfill is not None:
            self._backfill.stop()
            self._backfill = None
        if self._target_store is not None:
            self._target_store.close()
            self._target_store = None

    def _serve(self, state: MigrationState, index: IndexRef) -> None:
        if index.name == state.target.name:
            store: Any = self._open_target(state)
            model_settings = ModelSettings.model_validate({**self.settings.model.model_dump(), **state.target_model})
        else:
            store, model_settings = self._source_store, self.settings.model
        if self._switch is None:
            self._pending_serve = index  # applied when the API attaches
        else:
            self._switch(store, model_settings)
        self.admin.point_alias(index)

    def _stop_source_pipeline(self) -> None:
        stages = self.pipeline.stages
        for name in SOURCE_WRITERS:
            if name in stages.runners:
                stages.runners[name].request_stop()
        for name in SOURCE_WRITERS:
            thread = stages.threads.get(name)
            if thread is not None:
                thread.join(stages.runners[name].shutdown_grace_s + 10.0)
        if self._source_store is not None:
            self._source_store.close()  # the sink closed it already; closing again is harmless
            self._source_store = None

    def _drop(self, state: MigrationState, index: IndexRef) -> None:
        if index.name == state.source.name:
            if self._source_store is not None:
                self._source_store.close()
                self._source_store = None
            # Pipeline.stop closes the store the API serves from now on.
            if self._target_store is not None:
                self.pipeline.store = self._target_store
        self.admin.drop(index)

    def _remove_backfill_resources(self, state: MigrationState) -> None:
        self.kafka.remove(self.settings, backfill_topics(self.settings, state), backfill_groups(self.settings, state))

    # -- reading -----------------------------------------------------------------------
    def _progress(self, state: MigrationState) -> Progress:
        source = self._source_store.list_records() if self._source_store is not None else []
        target = self._open_target(state).list_records()
        return measure_progress(source, target)

    def _status(self, state: MigrationState, document_id: str | None = None) -> dict[str, Any]:
        measured = state.phase in ("backfilling", "cut_over") or (state.phase == "finished" and self._source_store)
        body = status_body(state, self._progress(state) if measured else None,
                           {"source": self._source_store, "target": self._target_store}, document_id)
        if self._backfill is not None:
            body["backfill"] = self._backfill.stats()
        return body


def status_body(state: MigrationState, progress: Progress | None, stores: dict[str, VectorStore | None],
                document_id: str | None = None) -> dict[str, Any]:
    """What ``colstream migrate status`` prints (``--json``): the state, the progress and each
    index's page counts; ``stores`` holds the open store of each role, None where it is gone."""
    body = state.as_dict()
    body["serving"] = state.serving.name
    if progress is not None:
        body.update(progress.as_dict())
    indexes: dict[str, Any] = {}
    for role, ref in (("source", state.source), ("target", state.target)):
        store = stores.get(role)
        if store is None:
            indexes[role] = {"name": ref.name, "exists": False}
            continue
        entry: dict[str, Any] = {"name": ref.name, "exists": True, "model": ref.model.label,
                                 "pages": store.count_pages()}
        if document_id is not None:
            entry["document_pages"] = store.count_pages(document_id)
        indexes[role] = entry
    body["indexes"] = indexes
    return body


def _keep_out_of_serving_health(runner: StageRunner, serving: StageThreads) -> None:
    """A backfill runner registered its health under the serving stage's name (the handlers
    name their stage); take it out and put the serving stage's back, so a slow backfill never
    fails ``/livez`` of the pipeline that serves."""
    from colstream.infra.health import HEALTH

    HEALTH.unregister(runner.health)
    own = serving.runners.get(runner.handler.name)
    if own is not None:
        HEALTH.register(own.health)
