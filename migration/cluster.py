"""The migration on a cluster: each step a Kubernetes Job, the state in Qdrant.

On a cluster the stages are Deployments of their own and no process holds both the
pipeline and the API, so the core's actions (:mod:`colstream.migration.core`) are
carried out by short-lived steps and one long-running backfill, all reading one state
that every pod can see:

* the state is one point in the ``migrations_collection`` of the Qdrant server
  (:class:`QdrantStateStore`), keyed by the alias it migrates;
* ``colstream migrate <step> --cluster`` (the step Jobs) creates the target index and
  the backfill's topics, switches the alias, drops an index and removes the backfill's
  topics and groups (:class:`ClusterMigrations`);
* ``colstream migrate backfill`` (the backfill Job, on a GPU node) runs the new model's
  splitter, embedder and sink in consumer groups and topics of the migration's own, into
  the target pinned by name, until the migration is finished or aborted
  (:func:`run_backfill`);
* serving sinks started while a migration is active write the index of their own model,
  pinned by name (:func:`open_serving_store`), and API replicas follow the alias within
  ``qdrant.alias_follow_s`` of a cutover (:mod:`colstream.api.following`).

k8s/components/migration holds the Jobs; docs/operations.md gives the procedure.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from colstream.infra.settings import ColstreamSettings, QdrantSettings
from colstream.infra.vectorstore import IndexModel, VectorStore, open_vector_store
from colstream.migration.core import (
    BACKFILL_STAGES,
    Action,
    CreateIndex,
    DropIndex,
    FileStateStore,
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
    require,
    serving_index_for,
    state_file,
)
from colstream.migration.embedded import (
    BackfillKafka,
    IndexAdmin,
    KafkaBackfillResources,
    _index_model_for,
    index_admin,
    plan_new_migration,
    status_body,
    target_model_settings,
)

if TYPE_CHECKING:
    from qdrant_client import QdrantClient

log = logging.getLogger(__name__)

# How long finish and abort wait for the backfill Job to leave its consumer groups before
# they delete its topics and groups (it checks the state every BACKFILL_POLL_S).
BACKFILL_EXIT_WAIT_S = 180.0
BACKFILL_POLL_S = 5.0


class QdrantStateStore:
    """The migration state as the payload of one point of a vectorless collection on the
    Qdrant server, so that every Job, stage and API replica reads the same state."""

    def __init__(self, qdrant: QdrantSettings, client: QdrantClient | None = None) -> None:
        self.qdrant = qdrant
        self.collection = qdrant.migrations_collection
        # One migration per alias: a deployment with another alias has a state of its own.
        self.point_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"colstream-migration:{qdrant.collection}"))
        self._client = client

    @property
    def client(self) -> QdrantClient:
        if self._client is None:
            from colstream.infra.vectorstore_qdrant import server_client

            self._client = server_client(self.qdrant, timeout_s=60)
        return self._client

    def load(self) -> MigrationState | None:
        if not self.client.collection_exists(self.collection):
            return None
        found = self.client.retrieve(self.collection, ids=[self.point_id], with_payload=True)
        if not found or not found[0].payload:
            return None
        return MigrationState.from_dict(found[0].payload["state"])

    def save(self, state: MigrationState) -> None:
        from qdrant_client import models as qm

        if not self.client.collection_exists(self.collection):
            try:
                self.client.create_collection(self.collection, vectors_config={})
            except Exception:
                if not self.client.collection_exists(self.collection):  # created meanwhile by another pod
                    raise
        payload = {"alias": self.qdrant.collection, "state": state.as_dict()}
        self.client.upsert(self.collection, points=[qm.PointStruct(id=self.point_id, vector={}, payload=payload)],
                           wait=True)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def state_store_for(settings: ColstreamSettings) -> StateStore:
    """Where stages and Jobs started on their own find the migration: in Qdrant on a server,
    else the file beside the embedded shards."""
    return QdrantStateStore(settings.qdrant) if settings.qdrant.url else FileStateStore(state_file(settings))


def open_serving_store(
    settings: ColstreamSettings,
    *,
    state_store: StateStore | None = None,
    model_identity: Callable[[Any], IndexModel] = _index_model_for,
) -> VectorStore:
    """The store a serving sink started on its own writes: while a migration is active, the
    index of its own model by name (the alias moves at cutover); otherwise the alias."""
    store_of_state = state_store or state_store_for(settings)
    try:
        state = store_of_state.load()
    finally:
        closer = getattr(store_of_state, "close", None)
        if state_store is None and callable(closer):
            closer()
    index = serving_index_for(state, model_identity(settings.model)) if state is not None and state.active else None
    if index is None:
        return open_vector_store(settings.qdrant)
    assert state is not None
    log.info("migration %s is %s: writing %s by name", state.migration_id, state.phase, index.name)
    return index_admin(settings.qdrant).open(index)


class ClusterMigrations:
    """The ``migrate`` steps carried out here, against the Qdrant server and Kafka, as the
    step Jobs run them. The backfill and the serving stages live in other pods: they read
    the state this writes (stopping the backfill is its Job leaving on the next state it
    reads), so the state is saved before any action that they must see first."""

    def __init__(
        self,
        settings: ColstreamSettings,
        *,
        state_store: StateStore | None = None,
        admin: IndexAdmin | None = None,
        kafka: BackfillKafka | None = None,
        model_identity: Callable[[Any], IndexModel] = _index_model_for,
        open_serving: Callable[[], VectorStore] | None = None,
        backfill_exit_wait_s: float = BACKFILL_EXIT_WAIT_S,
    ) -> None:
        """``open_serving`` opens the index the alias serves now (the source of a new migration)."""
        self.settings = settings
        self._open_serving = open_serving or (lambda: open_vector_store(settings.qdrant))
        self.state_store = state_store or state_store_for(settings)
        self.admin = admin or index_admin(settings.qdrant)
        self.kafka = kafka or KafkaBackfillResources()
        self._identity = model_identity
        self.backfill_exit_wait_s = backfill_exit_wait_s

    def start(self, family: str, name_or_path: str | None, revision: str | None, tiny_model: bool) -> dict[str, Any]:
        model_settings = target_model_settings(self.settings, family, name_or_path, revision, tiny_model)
        serving = self._open_serving()
        try:
            state, actions = plan_new_migration(self.settings, self.state_store.load(), serving, model_settings,
                                                self._identity(model_settings))
        finally:
            serving.close()
        self._carry_out(state, actions)  # the index and topics exist before the backfill Job reads the state
        self.state_store.save(state)
        return self.status()

    def status(self, document_id: str | None = None) -> dict[str, Any]:
        state = require(self.state_store.load())
        stores = self._open_stores(state)
        try:
            measured = state.phase in ("backfilling", "cut_over") or (
                state.phase == "finished" and stores["source"] is not None)
            progress = self._progress(stores) if measured else None
            return status_body(state, progress, stores, document_id)
        finally:
            _close_all(stores)

    def cutover(self, force: bool = False) -> dict[str, Any]:
        state = require(self.state_store.load())
        progress = Progress(0, 0, 0, 0)
        if state.phase == "backfilling":
            stores = self._open_stores(state)
            try:
                progress = self._progress(stores)
            finally:
                _close_all(stores)
        cut, actions = plan_cutover(state, progress, force=force)
        self._carry_out(cut, actions)
        self.state_store.save(cut)
        return self.status()

    def finish(self) -> dict[str, Any]:
        """Drop the old index. The serving Deployments run the new model by now (they were
        rolled after the cutover), so the backfill is no longer needed either: it leaves on
        the state saved here, and its topics and groups go."""
        done, actions = plan_finish(self.state_store.load())
        if actions:
            done = replace(done, cleaned_up=True)
            self.state_store.save(done)
            self._carry_out(done, [*actions, RemoveBackfillResources()])
        return self.status()

    def abort(self) -> dict[str, Any]:
        aborted, actions = plan_abort(self.state_store.load())
        if actions:
            self.state_store.save(aborted)  # the backfill Job leaves before its index is dropped
            self._carry_out(aborted, actions)
        return self.status()

    # -- actions -----------------------------------------------------------------------
    def _carry_out(self, state: MigrationState, actions: Sequence[Action]) -> None:
        for action in actions:
            if isinstance(action, CreateIndex):
                store = self.admin.open(action.index)
                try:
                    store.ensure_collections(model=action.index.model)
                finally:
                    store.close()
            elif isinstance(action, StartBackfill):
                self.kafka.ensure_topics(backfill_settings(self.settings, state))
            elif isinstance(action, ServeIndex):
                self.admin.point_alias(action.index)  # the API replicas follow it
            elif isinstance(action, StopBackfill):
                self._wait_for_backfill_exit(state)
            elif isinstance(action, StopSourcePipeline):
                log.info("migration %s: the old model's Deployments must be gone (rolled to %s) before its "
                         "index is dropped", state.migration_id, state.target.model.describe())
            elif isinstance(action, DropIndex):
                if action.index.name == state.target.name:
                    self._wait_for_backfill_exit(state)
                self.admin.drop(action.index)
            elif isinstance(action, RemoveBackfillResources):
                self._wait_for_backfill_exit(state)
                self.kafka.remove(self.settings, backfill_topics(self.settings, state),
                                  backfill_groups(self.settings, state))

    def _wait_for_backfill_exit(self, state: MigrationState) -> None:
        groups = backfill_groups(self.settings, state)
        if not self.kafka.wait_idle(self.settings, groups, self.backfill_exit_wait_s):
            log.warning("migration %s: the backfill's groups %s still have members after %.0fs; going on",
                        state.migration_id, groups, self.backfill_exit_wait_s)

    # -- reading -----------------------------------------------------------------------
    def _open_stores(self, state: MigrationState) -> dict[str, VectorStore | None]:
        exists = self.admin.exists
        return {role: self.admin.open(ref) if exists(ref) else None
                for role, ref in (("source", state.source), ("target", state.target))}

    @staticmethod
    def _progress(stores: dict[str, VectorStore | None]) -> Progress:
        source, target = stores["source"], stores["target"]
        return measure_progress(source.list_records() if source else [], target.list_records() if target else [])


def _close_all(stores: dict[str, VectorStore | None]) -> None:
    for store in stores.values():
        if store is not None:
            store.close()


# -- the backfill Job --------------------------------------------------------------------------
def run_backfill(
    settings: ColstreamSettings,
    *,
    state_store: StateStore | None = None,
    admin: IndexAdmin | None = None,
    stop: threading.Event | None = None,
    poll_s: float = BACKFILL_POLL_S,
    stages: Sequence[str] = BACKFILL_STAGES,
) -> int:
    """The new model's ``stages`` (splitter, embedder and sink by default) in this process,
    into the target index, until the migration is finished or aborted (or ``stop`` is set).
    A cluster splits them by image: the embedder on a GPU node, splitter and sink on the
    CPU image that converts Office files. 0: the migration no longer needs a backfill; 1:
    a stage died (the Job's pod restarts and resumes from the groups' committed offsets)."""
    unknown = sorted(set(stages) - set(BACKFILL_STAGES))
    if unknown or not stages:
        raise ValueError(f"backfill stages are {', '.join(BACKFILL_STAGES)}; got {', '.join(stages) or 'none'}")
    from colstream.app import StageThreads, build_stage

    state_store = state_store or state_store_for(settings)
    admin = admin or index_admin(settings.qdrant)
    stop = stop or threading.Event()
    state = state_store.load()
    if state is None or not state.active:
        log.info("no active migration: nothing to backfill")
        return 0
    derived = backfill_settings(settings, state)
    KafkaBackfillResources().ensure_topics(derived)
    store = admin.open(state.target)
    threads = StageThreads()
    try:
        for name in (stage for stage in BACKFILL_STAGES if stage in stages):
            threads.start(f"backfill-{name}", build_stage(name, derived, store))  # type: ignore[arg-type]
        log.info("migration %s: backfilling %s with %s", state.migration_id, state.target.name,
                 state.target.model.describe())
        while not stop.wait(poll_s):
            if threads.failures:
                log.error("migration %s: backfill stage failed: %s", state.migration_id, threads.failures)
                return 1
            try:
                current = state_store.load()
            except Exception as exc:  # Qdrant briefly away: keep going, read again next time
                log.warning("migration %s: reading the state: %s", state.migration_id, exc)
                continue
            if current is None or current.migration_id != state.migration_id or not current.active:
                log.info("migration %s is %s: the backfill stops", state.migration_id,
                         current.phase if current else "gone")
                return 0
        return 0
    finally:
        threads.stop()
        store.close()
