"""The cluster adapter carries out each step as its Job does: on in-memory indexes, Kafka and state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from colstream.infra.settings import ColstreamSettings
from colstream.infra.vectorstore import IndexModel
from colstream.migration.cluster import ClusterMigrations, open_serving_store
from colstream.migration.core import MigrationError, serving_index_for
from colstream.schemas.events import DocumentRecord
from colstream.testing.migration import MemoryIndex, MemoryIndexAdmin, MemoryStateStore

OLD = IndexModel(family="colqwen2", model_id="old-model", revision="r1", dim=128)
NEW = IndexModel(family="colpali", model_id="new-model", revision="r2", dim=128)


class FakeKafka:
    """Topics and groups of the backfill; ``busy`` polls of wait_idle before the backfill Job left."""

    def __init__(self, state: MemoryStateStore) -> None:
        self.state = state
        self.log: list[tuple[str, Any]] = []
        self.busy = 0

    def ensure_topics(self, settings: ColstreamSettings) -> None:
        self.log.append(("topics", settings.topics.pages))

    def remove(self, settings: ColstreamSettings, topics: list[str], groups: list[str]) -> None:
        self.log.append(("remove", (topics, groups)))

    def wait_idle(self, settings: ColstreamSettings, groups: list[str], timeout_s: float) -> bool:
        # The backfill Job leaves only once it has read a state that no longer needs it.
        latest = self.state.load()
        self.log.append(("wait_idle", latest.phase if latest else None))
        return latest is not None and not latest.active


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.settings = ColstreamSettings().updated(state_dir=tmp_path, qdrant={"path": tmp_path / "q"},
                                                    consumer_group_prefix="cs-")
        self.admin = MemoryIndexAdmin()
        self.source = self.admin.indexes.setdefault(
            "colpali_embeddings--old", MemoryIndex("colpali_embeddings--old", "colstream_documents", model=OLD))
        self.admin.alias = self.source.name
        self.state = MemoryStateStore()
        self.kafka = FakeKafka(self.state)
        self.migrations = ClusterMigrations(
            self.settings, state_store=self.state, admin=self.admin, kafka=self.kafka,
            model_identity=lambda m: NEW if m.family == "colpali" else OLD, open_serving=lambda: self.source,
        )

    def target(self) -> MemoryIndex:
        (name,) = [n for n in self.admin.indexes if n != self.source.name]
        return self.admin.indexes[name]


def rec(doc: str, version: int, pages: int = 2) -> DocumentRecord:
    return DocumentRecord(document_id=doc, version=version, state="complete", total_pages=pages,
                          indexed_pages=list(range(1, pages + 1)))


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def test_start_creates_the_index_and_topics_before_the_state_that_starts_the_backfill_job(h: Harness) -> None:
    h.source.put(rec("a", 1))
    status = h.migrations.start("colpali", "new-model", None, False)
    target = h.target()
    assert target.ensured_with == [NEW] and target.records_name.endswith(target.name)
    assert h.kafka.log == [("topics", f"{h.settings.topics.pages}.migrate-{status['migration_id']}")]
    assert [s.phase for s in h.state.saved] == ["backfilling"]
    assert status["serving"] == h.source.name and h.admin.alias == h.source.name
    assert status["documents"] == {"done": 0, "total": 1}
    with pytest.raises(MigrationError, match="backfilling"):
        h.migrations.start("colpali", "new-model", None, False)


def test_cutover_waits_for_the_backfill_then_moves_the_alias(h: Harness) -> None:
    h.source.put(rec("a", 1))
    h.migrations.start("colpali", "new-model", None, False)
    with pytest.raises(MigrationError, match="not complete") as early:
        h.migrations.cutover()
    assert early.value.kind == "not_ready" and h.admin.alias == h.source.name
    h.target().put(rec("a", 1), pages=2)
    cut = h.migrations.cutover()
    assert cut["phase"] == "cut_over" and h.admin.alias == h.target().name == cut["serving"]


def test_finish_saves_the_state_the_backfill_leaves_on_then_drops_the_old_index_and_its_topics(h: Harness) -> None:
    h.migrations.start("colpali", "new-model", None, False)
    with pytest.raises(MigrationError, match="cutover first"):
        h.migrations.finish()
    h.migrations.cutover()
    h.kafka.log.clear()
    done = h.migrations.finish()
    assert h.state.saved[-1].phase == "finished" and h.state.saved[-1].cleaned_up
    assert h.admin.dropped == [h.source.name] and done["indexes"]["source"]["exists"] is False
    # the topics and groups go only after the backfill Job saw the finished state and left
    kinds = [kind for kind, _ in h.kafka.log]
    assert kinds == ["wait_idle", "remove"] and h.kafka.log[0][1] == "finished"
    (topics, groups) = h.kafka.log[1][1]
    assert all(".migrate-" in t for t in topics) and all(g.startswith("cs-migrate-") for g in groups)
    assert h.migrations.finish()["phase"] == "finished"  # repeated: nothing more


def test_abort_after_cutover_serves_the_old_index_again_and_drops_the_new_one_after_the_backfill_left(
    h: Harness,
) -> None:
    h.source.put(rec("a", 1))
    h.migrations.start("colpali", "new-model", None, False)
    target = h.target().name
    h.migrations.cutover(force=True)
    assert h.state.saved[-1].forced_cutover
    h.kafka.log.clear()
    aborted = h.migrations.abort()
    assert aborted["phase"] == "aborted" and h.admin.alias == h.source.name
    assert h.admin.dropped == [target] and target not in h.admin.indexes
    assert ("wait_idle", "aborted") in h.kafka.log and h.kafka.log[-1][0] == "remove"
    with pytest.raises(MigrationError, match="is aborted"):
        h.migrations.cutover()


def test_a_serving_stage_pins_the_index_of_its_own_model_while_a_migration_is_active(h: Harness) -> None:
    h.migrations.start("colpali", "new-model", None, False)
    state = h.state.load()
    assert state is not None
    assert serving_index_for(state, OLD) == state.source and serving_index_for(state, NEW) == state.target
    other = IndexModel(family="colqwen3", model_id="third", revision="r", dim=320)
    assert serving_index_for(state, other) is None  # follows the alias, and is refused there
    h.migrations.cutover(force=True)
    h.migrations.finish()
    assert serving_index_for(h.state.load(), NEW) is None  # finished: the alias is the new index


def test_open_serving_store_without_a_migration_opens_the_alias(tmp_path: Path) -> None:
    settings = ColstreamSettings().updated(state_dir=tmp_path, qdrant={"path": tmp_path / "q"})
    calls: list[Any] = []
    store = open_serving_store(settings, state_store=MemoryStateStore(),
                               model_identity=lambda m: calls.append(m) or OLD)
    try:
        assert calls == []  # nothing active: the model is not even read
        assert store.index_name == settings.qdrant.collection
    finally:
        store.close()


def test_the_state_lives_in_qdrant_one_point_per_alias_where_every_pod_reads_it(
    qdrant_url: str, tmp_path: Path
) -> None:
    import uuid

    from colstream.migration.cluster import QdrantStateStore
    from colstream.migration.core import IndexRef, plan_cutover, plan_start

    unique = uuid.uuid4().hex[:8]  # the session's server is shared by other tests
    settings = ColstreamSettings().updated(state_dir=tmp_path, qdrant={
        "url": qdrant_url, "collection": f"alias_{unique}", "migrations_collection": f"migrations_{unique}"})
    writer, reader = QdrantStateStore(settings.qdrant), QdrantStateStore(settings.qdrant)
    other = QdrantStateStore(settings.updated(qdrant={"collection": f"other_{unique}"}).qdrant)
    try:
        assert reader.load() is None  # no collection yet
        state, _ = plan_start(None, migration_id="m1", source=IndexRef("a--old", "records", OLD),
                              target=IndexRef("a--new", "records--a--new", NEW), target_model={"family": "colpali"})
        writer.save(state)
        assert reader.load() == state and other.load() is None
        cut, _ = plan_cutover(state, measure_nothing(), force=True)
        writer.save(cut)
        loaded = reader.load()
        assert loaded == cut and loaded is not None and loaded.phase == "cut_over" and loaded.forced_cutover
    finally:
        for store in (writer, reader, other):
            store.close()


def measure_nothing() -> Any:
    from colstream.migration.core import measure_progress

    return measure_progress([rec("a", 1)], [])
