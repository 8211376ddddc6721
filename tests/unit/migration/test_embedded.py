"""The embedded adapter carries out the core's actions: on in-memory indexes, stages and state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from colstream.app import Pipeline, StageThreads
from colstream.infra.settings import ColstreamSettings, ModelSettings
from colstream.infra.vectorstore import IndexModel
from colstream.migration.core import MigrationError
from colstream.migration.embedded import EmbeddedMigrations
from colstream.schemas.events import DocumentRecord
from colstream.testing.migration import FakeRunner, MemoryIndex, MemoryIndexAdmin, MemoryStateStore

OLD = IndexModel(family="colqwen2", model_id="old-model", revision="r1", dim=128)
NEW = IndexModel(family="colpali", model_id="new-model", revision="r2", dim=128)


class FakeKafka:
    def __init__(self) -> None:
        self.created: list[ColstreamSettings] = []
        self.removed: list[tuple[list[str], list[str]]] = []

    def ensure_topics(self, settings: ColstreamSettings) -> None:
        self.created.append(settings)

    def remove(self, settings: ColstreamSettings, topics: list[str], groups: list[str]) -> None:
        self.removed.append((topics, groups))


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.settings = ColstreamSettings().updated(state_dir=tmp_path, qdrant={"path": tmp_path / "q"},
                                                    consumer_group_prefix="cs-")
        self.source = MemoryIndex("colpali_embeddings--old", "colstream_documents", model=OLD)
        self.stages = StageThreads()
        for name in ("splitter", "embedder", "sink", "webhooks"):
            self.stages.start(name, FakeRunner(name, self.settings))  # type: ignore[arg-type]
        self.pipeline = Pipeline(settings=self.settings, store=self.source, stages=self.stages)  # type: ignore[arg-type]
        self.admin = MemoryIndexAdmin()
        self.state = MemoryStateStore()
        self.kafka = FakeKafka()
        self.built: list[tuple[str, ColstreamSettings, Any]] = []
        self.switches: list[tuple[Any, ModelSettings]] = []
        self.migrations = self.new_runtime()

    def new_runtime(self) -> EmbeddedMigrations:
        migrations = EmbeddedMigrations(
            self.pipeline, state_store=self.state, admin=self.admin, build_stage=self.build, kafka=self.kafka,
            model_identity=lambda m: NEW if m.family == "colpali" else OLD,
        )
        migrations.attach_api(lambda store, model: self.switches.append((store, model)))
        return migrations

    def build(self, name: str, settings: ColstreamSettings, store: Any) -> FakeRunner:
        self.built.append((name, settings, store))
        return FakeRunner(name, settings)

    def target(self) -> MemoryIndex:
        (name,) = [n for n in self.admin.indexes if n != self.source.name]
        return self.admin.indexes[name]


def rec(doc: str, version: int, state: str = "complete", pages: int = 2) -> DocumentRecord:
    return DocumentRecord(document_id=doc, version=version, state=state, total_pages=pages,  # type: ignore[arg-type]
                          indexed_pages=list(range(1, pages + 1)) if state != "indexing" else [1])


@pytest.fixture
def h(tmp_path: Path) -> Any:
    harness = Harness(tmp_path)
    yield harness
    harness.migrations.close()
    harness.stages.stop(timeout_s=5)
    from colstream.infra.health import HEALTH

    for runner in harness.stages.runners.values():
        HEALTH.unregister(runner.health)


def test_start_creates_the_target_and_runs_a_backfill_of_the_new_model_beside_the_pipeline(h: Harness) -> None:
    status = h.migrations.start("colpali", "new-model", None, False)
    target = h.target()
    assert target.ensured_with[0] == NEW and target.records_name.endswith(target.name)
    assert [name for name, _, _ in h.built] == ["splitter", "embedder", "sink"]
    assert all(store is target for _, _, store in h.built)
    derived = h.built[0][1]
    assert derived.model.family == "colpali" and derived.consumer_group_prefix.startswith("cs-migrate-")
    assert h.kafka.created == [derived]
    # the serving stages are untouched and search still serves the source
    assert all(t.is_alive() for t in h.stages.threads.values()) and h.switches == []
    assert status["phase"] == "backfilling" and status["serving"] == h.source.name
    with pytest.raises(MigrationError):
        h.migrations.start("colpali", "new-model", None, False)


def test_status_counts_and_cutover_waits_for_the_backfill(h: Harness) -> None:
    h.source.put(rec("a", 1), pages=2)
    h.source.put(rec("b", 2), pages=2)
    h.migrations.start("colpali", "new-model", None, False)
    target = h.target()
    target.put(rec("a", 1), pages=2)
    target.put(rec("b", 2, state="indexing"), pages=1)
    status = h.migrations.status(document_id="b")
    assert status["documents"] == {"done": 1, "total": 2} and status["pages"] == {"done": 3, "total": 4}
    assert status["indexes"]["source"]["document_pages"] == 2 and status["indexes"]["target"]["document_pages"] == 1
    with pytest.raises(MigrationError) as early:
        h.migrations.cutover()
    assert early.value.kind == "not_ready"
    target.put(rec("b", 2), pages=2)
    cut = h.migrations.cutover()
    assert cut["phase"] == "cut_over" and cut["serving"] == target.name
    ((store, model),) = h.switches
    assert store is target and (model.family, model.name_or_path) == ("colpali", "new-model")
    assert h.admin.alias == target.name


def test_finish_stops_the_old_writers_and_drops_the_old_index(h: Harness) -> None:
    h.migrations.start("colpali", "new-model", None, False)
    h.migrations.cutover(force=True)
    done = h.migrations.finish()
    assert done["phase"] == "finished" and h.admin.dropped == [h.source.name] and h.source.closed
    assert not any(h.stages.threads[n].is_alive() for n in ("splitter", "embedder", "sink"))
    assert h.stages.threads["webhooks"].is_alive()
    # the backfill keeps feeding the new index; the pipeline now closes that store on stop
    assert h.pipeline.store is h.target() and not h.target().closed


def test_abort_after_cutover_serves_the_source_again_and_drops_the_target(h: Harness) -> None:
    h.migrations.start("colpali", "new-model", None, False)
    target = h.target()
    h.migrations.cutover(force=True)
    aborted = h.migrations.abort()
    assert aborted["phase"] == "aborted"
    assert h.switches[-1][0] is h.source and h.switches[-1][1].family == h.settings.model.family
    assert h.admin.alias == h.source.name and h.admin.dropped == [target.name] and target.closed
    assert h.kafka.removed and all("migrate-" in t for t in h.kafka.removed[0][0])


def test_a_restarted_process_resumes_the_backfill_and_the_cutover(h: Harness) -> None:
    h.migrations.start("colpali", "new-model", None, False)
    h.migrations.cutover(force=True)
    h.migrations.close()
    h.built.clear()
    h.switches.clear()
    restarted = EmbeddedMigrations(h.pipeline, state_store=h.state, admin=h.admin, build_stage=h.build,
                                   kafka=h.kafka, model_identity=lambda m: OLD)
    restarted.resume()
    assert [n for n, _, _ in h.built] == ["splitter", "embedder", "sink"]
    assert h.switches == []  # the API is not up yet ...
    restarted.attach_api(lambda store, model: h.switches.append((store, model)))
    assert len(h.switches) == 1 and h.switches[0][1].family == "colpali"  # ... it serves the target once it is
    restarted.close()


def test_the_new_model_settings_keep_the_serving_tunables_and_tiny_builds_a_local_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import ValidationError

    import colstream.embedding.tiny as tiny
    from colstream.migration.embedded import target_model_settings

    settings = ColstreamSettings().updated(state_dir=tmp_path, model={"batch_size": 3, "device": "cpu"})
    built: list[tuple[str, Path]] = []
    monkeypatch.setattr(tiny, "ensure_tiny_checkpoint",
                        lambda family, root: built.append((family, root)) or root / f"tiny-{family}")
    model = target_model_settings(settings, "colpali", "ignored", "rev", tiny_model=True)
    assert built == [("colpali", tmp_path / "models")]
    assert (model.family, model.name_or_path, model.revision) == ("colpali", str(tmp_path / "models" / "tiny-colpali"),
                                                                  None)
    assert (model.batch_size, model.device) == (3, "cpu")
    assert target_model_settings(settings, "colpali", "vidore/colpali-v1.3", None, False).name_or_path == (
        "vidore/colpali-v1.3")
    with pytest.raises(ValidationError):
        target_model_settings(settings, "no-such-family", None, None, False)


def test_a_restarted_pipeline_writes_the_source_by_name_while_a_migration_is_active(tmp_path: Path) -> None:
    from colstream.app import _migrating_source_store
    from colstream.infra.vectorstore_edge import EdgeVectorStore, point_alias
    from colstream.migration.core import FileStateStore, IndexRef, plan_cutover, plan_finish, plan_start, state_file

    settings = ColstreamSettings().updated(state_dir=tmp_path, qdrant={"path": tmp_path / "q", "url": None})
    assert _migrating_source_store(settings) is None  # no migration: follow the alias
    source_store = EdgeVectorStore(settings.qdrant)
    source_store.ensure_collections(model=OLD)
    source = IndexRef(source_store.index_name, source_store.records_name, OLD)
    source_store.close()
    target_store = EdgeVectorStore(settings.qdrant, index="colpali_embeddings--new", records="records--new")
    target_store.ensure_collections(model=NEW)
    target_store.close()
    target = IndexRef("colpali_embeddings--new", "records--new", NEW)
    state, _ = plan_start(None, migration_id="m1", source=source, target=target, target_model={"family": "colpali"})
    cut, _ = plan_cutover(state, measure_nothing(), force=True)
    FileStateStore(state_file(settings)).save(cut)
    point_alias(settings.qdrant, target.name)  # what the cutover did
    pinned = _migrating_source_store(settings)
    assert pinned is not None and pinned.index_name == source.name and pinned.index_model() == OLD  # type: ignore[attr-defined]
    pinned.close()
    done, _ = plan_finish(cut)
    FileStateStore(state_file(settings)).save(done)
    assert _migrating_source_store(settings) is None  # finished: the alias serves the new index


def measure_nothing() -> Any:
    from colstream.migration.core import Progress

    return Progress(0, 0, 0, 0)
