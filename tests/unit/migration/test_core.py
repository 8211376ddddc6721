"""The migration's pure core: transitions, their actions, progress, backfill settings, state."""

from __future__ import annotations

from pathlib import Path

import pytest

from colstream.infra.settings import ColstreamSettings
from colstream.infra.vectorstore import IndexModel
from colstream.migration.core import (
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
    StopBackfill,
    StopSourcePipeline,
    backfill_groups,
    backfill_settings,
    backfill_topics,
    measure_progress,
    pipeline_index,
    plan_abort,
    plan_cutover,
    plan_finish,
    plan_resume,
    plan_start,
)
from colstream.schemas.events import DocumentRecord

OLD = IndexModel(family="colqwen2", model_id="vidore/colqwen2-v1.0", revision="abc", dim=128)
NEW = IndexModel(family="colpali", model_id="vidore/colpali-v1.2", revision="def", dim=128)
SOURCE = IndexRef(name="colpali_embeddings--colqwen2-v1.0--11111111", records="colstream_documents", model=OLD)
TARGET = IndexRef(name="colpali_embeddings--colpali-v1.2--22222222",
                  records="colstream_documents--colpali_embeddings--colpali-v1.2--22222222", model=NEW)
DONE = Progress(documents_total=2, documents_done=2, pages_total=5, pages_done=5)
HALF = Progress(documents_total=2, documents_done=1, pages_total=5, pages_done=3)


def started() -> MigrationState:
    state, _ = plan_start(None, migration_id="m1", source=SOURCE, target=TARGET,
                          target_model={"family": "colpali", "name_or_path": "vidore/colpali-v1.2"}, now="t0")
    return state


def record(doc: str, version: int, state: str = "complete", total: int = 2, indexed: int | None = None,
           failed: tuple[int, ...] = ()) -> DocumentRecord:
    pages = list(range(1, (total if indexed is None else indexed) + 1))
    return DocumentRecord(document_id=doc, version=version, state=state, total_pages=total,  # type: ignore[arg-type]
                          indexed_pages=pages, failed_pages=list(failed))


def test_start_creates_the_target_then_starts_the_backfill_and_keeps_serving_the_source() -> None:
    state, actions = plan_start(None, migration_id="m1", source=SOURCE, target=TARGET, target_model={}, now="t0")
    assert actions == [CreateIndex(TARGET), StartBackfill(TARGET)]
    assert state.phase == "backfilling" and state.active and state.serving == SOURCE
    # the serving pipeline writes the source by name while the alias may move
    assert pipeline_index(state) == SOURCE


def test_start_is_refused_while_a_migration_is_active_or_when_the_model_is_the_same() -> None:
    with pytest.raises(MigrationError) as active:
        plan_start(started(), migration_id="m2", source=SOURCE, target=TARGET, target_model={})
    assert active.value.status_code == 409 and "m1" in active.value.message
    with pytest.raises(MigrationError) as same:
        plan_start(None, migration_id="m2", source=SOURCE, target=IndexRef("x", "y", OLD), target_model={})
    assert same.value.kind == "invalid"
    # a finished or aborted migration does not block the next one
    aborted, _ = plan_abort(started())
    assert plan_start(aborted, migration_id="m3", source=SOURCE, target=TARGET, target_model={})[0].phase == (
        "backfilling")


def test_progress_counts_documents_and_pages_the_target_has_settled() -> None:
    source = [
        record("a", 10),                                   # done at the same version
        record("b", 11, total=4),                          # target still indexing: 3 of 4 pages
        record("c", 12),                                   # not in the target yet
        record("d", 13),                                   # target saw a newer version (re-upload)
        record("e", 14, state="deleted", total=0, indexed=0),  # deleted: not live, not counted
        record("f", 15, state="partial", total=3, indexed=2, failed=(3,)),
    ]
    target = [
        record("a", 10),
        record("b", 11, state="indexing", total=4, indexed=3),
        record("d", 20, total=5),
        record("f", 15, state="partial", total=3, indexed=2, failed=(3,)),
        record("new", 30),                                 # uploaded meanwhile; the source lags
    ]
    progress = measure_progress(source, target)
    assert (progress.documents_done, progress.documents_total) == (3, 5)
    assert (progress.pages_done, progress.pages_total) == (2 + 3 + 0 + 2 + 3, 2 + 4 + 2 + 2 + 3)
    assert progress.pending == ("b", "c") and not progress.complete
    assert progress.target_only == 1
    finished = measure_progress(source, [*target, record("b", 11, total=4), record("c", 12)])
    assert finished.complete and finished.as_dict()["documents"] == {"done": 5, "total": 5}


def test_an_older_target_version_is_not_done() -> None:
    progress = measure_progress([record("a", 20)], [record("a", 10)])
    assert progress.documents_done == 0 and progress.pages_done == 0


def test_cutover_is_refused_before_the_backfill_is_complete_unless_forced() -> None:
    with pytest.raises(MigrationError) as early:
        plan_cutover(started(), HALF)
    assert early.value.kind == "not_ready" and "1/2 documents" in early.value.message
    assert "--force" in early.value.message
    forced, actions = plan_cutover(started(), HALF, force=True, now="t1")
    assert forced.phase == "cut_over" and forced.forced_cutover and actions == [ServeIndex(TARGET)]
    cut, actions = plan_cutover(started(), DONE, now="t1")
    assert cut.phase == "cut_over" and not cut.forced_cutover and cut.serving == TARGET
    assert actions == [ServeIndex(TARGET)]
    # the source pipeline still writes the source: dual writes go on until finish
    assert pipeline_index(cut) == SOURCE
    # repeated: serving the target again is all it does
    assert plan_cutover(cut, HALF) == (cut, [ServeIndex(TARGET)])


def test_finish_needs_a_cutover_then_stops_the_source_pipeline_and_drops_the_source() -> None:
    with pytest.raises(MigrationError) as early:
        plan_finish(started())
    assert early.value.kind == "conflict"
    cut, _ = plan_cutover(started(), DONE)
    done, actions = plan_finish(cut, now="t2")
    assert done.phase == "finished" and done.ended_at == "t2" and done.serving == TARGET
    assert actions == [StopSourcePipeline(), DropIndex(SOURCE)]
    assert plan_finish(done) == (done, [])
    with pytest.raises(MigrationError):
        plan_abort(done)
    with pytest.raises(MigrationError) as none:
        plan_finish(None)
    assert none.value.status_code == 404


def test_abort_drops_the_target_and_after_a_cutover_serves_the_source_first() -> None:
    aborted, actions = plan_abort(started())
    assert aborted.phase == "aborted" and aborted.serving == SOURCE
    assert actions == [StopBackfill(), DropIndex(TARGET), RemoveBackfillResources()]
    cut, _ = plan_cutover(started(), DONE)
    back, actions = plan_abort(cut)
    assert actions[0] == ServeIndex(SOURCE) and actions[1:] == [StopBackfill(), DropIndex(TARGET),
                                                                 RemoveBackfillResources()]
    assert back.serving == SOURCE and not back.active


def test_resume_restarts_the_backfill_and_serves_what_the_phase_says() -> None:
    assert plan_resume(None, OLD) == (None, [])
    assert plan_resume(started(), OLD)[1] == [StartBackfill(TARGET)]
    cut, _ = plan_cutover(started(), DONE)
    assert plan_resume(cut, OLD)[1] == [StartBackfill(TARGET), ServeIndex(TARGET)]
    done, _ = plan_finish(cut)
    # still configured for the old model: the backfill keeps the new index fed
    assert plan_resume(done, OLD) == (done, [StartBackfill(TARGET)])
    # configured for the new model: the serving pipeline writes it, the backfill goes
    cleaned, actions = plan_resume(done, NEW)
    assert actions == [RemoveBackfillResources()] and cleaned is not None and cleaned.cleaned_up
    assert plan_resume(cleaned, NEW)[1] == []


def test_backfill_settings_read_the_same_uploads_in_groups_and_topics_of_their_own(tmp_path: Path) -> None:
    settings = ColstreamSettings().updated(state_dir=tmp_path, consumer_group_prefix="cs-",
                                           model={"batch_size": 3}, qdrant={"path": tmp_path / "q"})
    state = started()
    derived = backfill_settings(settings, state)
    assert derived.topics.uploads == settings.topics.uploads and derived.topics.dlq == settings.topics.dlq
    assert derived.topics.pages == f"{settings.topics.pages}.migrate-m1"
    assert derived.topics.indexed != settings.topics.indexed  # no second webhook per document
    assert derived.consumer_group_prefix == "cs-migrate-m1-"
    assert (derived.model.family, derived.model.name_or_path, derived.model.batch_size) == (
        "colpali", "vidore/colpali-v1.2", 3)
    assert set(backfill_topics(settings, state)).isdisjoint(settings.topics.all_names())
    assert backfill_groups(settings, state) == ["cs-migrate-m1-splitter", "cs-migrate-m1-embedder",
                                                "cs-migrate-m1-sink"]


def test_the_state_survives_a_round_trip_through_its_file(tmp_path: Path) -> None:
    store = FileStateStore(tmp_path / "sub" / "migration.json")
    assert store.load() is None
    cut, _ = plan_cutover(started(), HALF, force=True, now="t1")
    store.save(cut)
    assert store.load() == cut
    assert not list((tmp_path / "sub").glob("*.tmp"))
