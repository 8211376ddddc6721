"""The index converges to latest-event-wins under kills, restarts, rebalances and replays.

Every test drives the real broker. Stages run as their own OS processes
(``colstream run <stage>``) wherever a test kills or restarts them.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colstream.infra.settings import ColstreamSettings
from colstream.infra.vectorstore import open_vector_store
from colstream.producers.publisher import UploadPublisher
from colstream.schemas import DocumentDeleted, DocumentRef, PageVectors, UploadEvent, encode
from tests.convergence import (
    Divergence,
    DocumentFactory,
    IndexModel,
    compare,
    keep_failing_seed,
    publish_random_operations,
    wait_all_committing,
    wait_drained,
    wipe,
    write_report,
)
from tests.harness import StageProcess, pipeline_in_threads, settings_env, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

STAGES = ("splitter", "embedder", "sink")


def _seed(name: str) -> int:
    return int(os.environ.get(f"COLSTREAM_SEED_{name.upper()}", random.SystemRandom().randint(0, 2**31)))


def _check(store_settings: ColstreamSettings, model: IndexModel, name: str, seed: int,
           figures: dict[str, int]) -> None:
    """Open the stopped sink's store and compare it with the model."""
    store = open_vector_store(store_settings.qdrant)
    try:
        divergence = compare(store, model)
    finally:
        store.close()
    _report(name, seed, model, divergence, figures)


def _report(name: str, seed: int, model: IndexModel, divergence: Divergence, figures: dict[str, int]) -> None:
    write_report(name, {**figures, "seed": seed, "operations": model.operations, "lost": divergence.lost,
                        "stale": divergence.stale, "duplicated": divergence.duplicated})
    if not divergence.ok:
        keep_failing_seed(name, seed, divergence)
    assert divergence.ok, divergence.details[:10]


def test_a_thousand_random_operations_converge_to_latest_event_wins(pipeline_settings: ColstreamSettings) -> None:
    settings = pipeline_settings
    seed = _seed("random_ops")
    rng = random.Random(seed)
    model = IndexModel()
    factory = DocumentFactory(settings, max_pages=3)
    publisher = UploadPublisher(settings)
    with pipeline_in_threads(settings) as store:
        publish_random_operations(publisher, factory, model, rng, 1000, [f"doc-{i}" for i in range(8)],
                                  max_pages=3)
        wait_drained(settings, timeout_s=900)
        divergence = compare(store, model)
    publisher.close()
    _report("random_operations", seed, model, divergence, {})


def test_vectors_of_an_old_version_arriving_after_the_delete_are_dropped(
    pipeline_settings: ColstreamSettings,
) -> None:
    """A zombie GPU replica that lost its partition still produces old vectors after a delete."""
    import numpy as np

    from colstream.infra.kafka import OutRecord, ProducerClient

    settings = pipeline_settings
    factory = DocumentFactory(settings, max_pages=2)
    publisher = UploadPublisher(settings)
    with pipeline_in_threads(settings, stages=("splitter", "embedder", "sink")) as store:
        v_upload = publisher.publish_upload(UploadEvent(document_id="race", blob_uri=factory.blob(2))).offset
        wait_for(lambda: store.count_pages("race") == 2, 120, what="2 pages")
        v_delete = publisher.publish_delete("race").offset
        assert v_upload is not None and v_delete is not None and v_delete > v_upload
        wait_for(lambda: store.get_records(["race"])["race"].state == "deleted", 60)
        zombie = ProducerClient(settings)
        late = PageVectors.from_array(document=DocumentRef(document_id="race", version=v_upload), page_number=1,
                                      total_pages=2, model="zombie", array=np.ones((4, 128), dtype=np.float32))
        zombie.send(OutRecord(settings.topics.vectors, "race", encode(late)))
        # and a duplicate of the delete itself, as a replay would bring
        zombie.send(OutRecord(settings.topics.vectors, "race",
                              encode(DocumentDeleted(document=DocumentRef(document_id="race", version=v_delete)))))
        zombie.flush_or_raise()
        wait_drained(settings, timeout_s=60)
        assert store.count_pages("race") == 0
        record = store.get_records(["race"])["race"]
        assert record.state == "deleted" and record.version == v_delete
    publisher.close()


def _start_all(settings: ColstreamSettings, log_dir: Path) -> dict[str, StageProcess]:
    return {s: StageProcess(s, settings, log_dir).start() for s in STAGES}


def test_sigkill_each_stage_twenty_times_loses_nothing(pipeline_settings: ColstreamSettings,
                                                        tmp_path: Path) -> None:
    settings = pipeline_settings
    seed = _seed("crash")
    rng = random.Random(seed)
    model = IndexModel()
    factory = DocumentFactory(settings, max_pages=4)
    publisher = UploadPublisher(settings)
    # Static membership: a restarted stage takes its partitions back at once, as a
    # StatefulSet pod would, instead of waiting out the dead member's session.
    procs = {s: StageProcess(s, settings, tmp_path, instance_id=f"{s}-0").start() for s in STAGES}
    kills = dict.fromkeys(STAGES, 0)
    try:
        doc_ids = [f"crash-{i}" for i in range(12)]
        publish_random_operations(publisher, factory, model, rng, 30, doc_ids, max_pages=4, delete_ratio=0.15)
        rounds = 20
        for _ in range(rounds):
            # keep work flowing so kills land mid-batch, mid-render and mid-write
            publish_random_operations(publisher, factory, model, rng, 6, doc_ids, max_pages=4, delete_ratio=0.2)
            for stage in rng.sample(STAGES, k=3):
                procs[stage].wait_consuming()
                time.sleep(rng.uniform(0.05, 1.5))
                procs[stage].kill()
                kills[stage] += 1
                procs[stage] = StageProcess(stage, settings, tmp_path, instance_id=f"{stage}-0").start()
        wait_drained(settings, timeout_s=600)
        assert procs["sink"].terminate() < 45
    finally:
        for proc in procs.values():
            proc.kill()
        publisher.close()
    assert min(kills.values()) >= 20
    _check(settings, model, "sigkill", seed, {f"kills_{s}": n for s, n in kills.items()})


def test_broker_restart_mid_run_reconnects_and_converges(pipeline_settings: ColstreamSettings,
                                                         tmp_path: Path) -> None:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip("the broker belongs to someone else: not restarting it")
    from tests.conftest import SESSION_STATE, session_broker

    settings = pipeline_settings
    broker = session_broker(SESSION_STATE)
    if broker.pid() is None:
        pytest.skip("the session broker was not started by this test run")
    seed = _seed("broker")
    rng = random.Random(seed)
    model = IndexModel()
    factory = DocumentFactory(settings, max_pages=3)
    publisher = UploadPublisher(settings)
    procs = _start_all(settings, tmp_path)
    try:
        doc_ids = [f"b-{i}" for i in range(6)]
        publish_random_operations(publisher, factory, model, rng, 20, doc_ids, max_pages=3)
        time.sleep(2)
        broker.stop()
        time.sleep(3)
        broker.start()
        publish_random_operations(publisher, factory, model, rng, 20, doc_ids, max_pages=3)
        wait_drained(settings, timeout_s=300)
        for stage, proc in procs.items():
            assert proc.alive(), f"{stage} died across the broker restart:\n{proc.log_tail()}"
        procs["sink"].terminate()
    finally:
        for proc in procs.values():
            proc.kill()
        publisher.close()
    _check(settings, model, "broker_restart", seed, {"broker_restarts": 1})


def test_replicas_joining_and_leaving_mid_run_lose_nothing(pipeline_settings: ColstreamSettings,
                                                           tmp_path: Path) -> None:
    """Two embedder replicas (processes) and two sink replicas join and leave mid-run.

    The embedded Qdrant shard belongs to one process, so the two sink replicas here
    are two group members in this process sharing that store; against a Qdrant
    server they would be separate pods (no server is reachable on this machine).
    """
    import threading

    from colstream.consumers.sink.stage import build_sink

    settings = pipeline_settings
    seed = _seed("rebalance")
    rng = random.Random(seed)
    model = IndexModel()
    factory = DocumentFactory(settings, max_pages=3)
    publisher = UploadPublisher(settings)
    store = open_vector_store(settings.qdrant)
    store.ensure_collections()
    sinks = []

    def start_sink() -> None:
        runner = build_sink(settings, store)
        runner.handler.close = lambda: None  # type: ignore[method-assign]  # the store is shared
        thread = threading.Thread(target=runner.run, daemon=True)
        thread.start()
        sinks.append((runner, thread))

    splitter = StageProcess("splitter", settings, tmp_path).start()
    embedders = [StageProcess("embedder", settings, tmp_path).start()]
    start_sink()
    try:
        doc_ids = [f"r-{i}" for i in range(8)]
        publish_random_operations(publisher, factory, model, rng, 25, doc_ids, max_pages=3)
        embedders.append(StageProcess("embedder", settings, tmp_path).start())
        start_sink()
        time.sleep(4)
        publish_random_operations(publisher, factory, model, rng, 25, doc_ids, max_pages=3)
        time.sleep(2)
        assert embedders[0].terminate() < 45
        sinks[0][0].request_stop()
        sinks[0][1].join(45)
        publish_random_operations(publisher, factory, model, rng, 25, doc_ids, max_pages=3)
        embedders.append(StageProcess("embedder", settings, tmp_path).start())
        start_sink()
        time.sleep(3)
        assert embedders[1].terminate() < 45
        sinks[1][0].request_stop()
        sinks[1][1].join(45)
        wait_drained(settings, timeout_s=300)
        divergence = compare(store, model)
    finally:
        for runner, thread in sinks:
            runner.request_stop()
            thread.join(45)
        for proc in [splitter, *embedders]:
            proc.kill()
        publisher.close()
        store.close()
    _report("rebalance", seed, model, divergence,
            {"embedder_joins": 2, "embedder_leaves": 2, "sink_joins": 2, "sink_leaves": 2})


def test_replay_from_the_beginning_rebuilds_a_wiped_index_identically(pipeline_settings: ColstreamSettings,
                                                                      tmp_path: Path) -> None:
    settings = pipeline_settings
    rng = random.Random(7)
    model = IndexModel()
    factory = DocumentFactory(settings, max_pages=4)
    publisher = UploadPublisher(settings)
    env = settings_env(settings)

    def documents_json() -> str:
        out = subprocess.run([sys.executable, "-m", "colstream", "documents", "--json"], env={
            **env, "COLSTREAM_API__PUBLIC_URL": "http://127.0.0.1:9"}, capture_output=True, text=True, check=True)
        return out.stdout

    def run_until_drained() -> None:
        procs = _start_all(settings, tmp_path)
        try:
            wait_drained(settings, timeout_s=300)
            for proc in procs.values():
                assert proc.terminate() < 45
        finally:
            for proc in procs.values():
                proc.kill()

    publish_random_operations(publisher, factory, model, rng, 40, [f"rp-{i}" for i in range(10)], max_pages=4)
    publisher.close()
    run_until_drained()
    before = documents_json()
    assert before.strip() not in ("", "[]")

    # 1. colstream replay --from-beginning, into a wiped Qdrant
    wipe(settings.qdrant.path)
    subprocess.run([sys.executable, "-m", "colstream", "replay", "--stage", "splitter", "--from-beginning"],
                   env=env, check=True, capture_output=True)
    run_until_drained()
    assert documents_json() == before

    # 2. Kafka's own kafka-consumer-groups --reset-offsets, into a wiped Qdrant again
    wipe(settings.qdrant.path)
    subprocess.run([sys.executable, "-m", "colstream", "kafka", "tool", "kafka-consumer-groups",
                    "--bootstrap-server", settings.kafka.bootstrap_servers or "", "--group",
                    f"{settings.consumer_group_prefix}splitter", "--topic", settings.topics.uploads,
                    "--reset-offsets", "--to-earliest", "--execute"], env=env, check=True, capture_output=True)
    run_until_drained()
    assert documents_json() == before
    _check(settings, model, "replay", 0, {"replays": 2})


def test_sigterm_exits_within_the_bound_and_nothing_is_lost(pipeline_settings: ColstreamSettings,
                                                            tmp_path: Path) -> None:
    settings = pipeline_settings
    model = IndexModel()
    factory = DocumentFactory(settings, max_pages=4)
    publisher = UploadPublisher(settings)
    rng = random.Random(11)
    procs = _start_all(settings, tmp_path)
    exits: dict[str, float] = {}
    try:
        doc_ids = [f"g-{i}" for i in range(10)]
        publish_random_operations(publisher, factory, model, rng, 20, doc_ids, max_pages=4)
        wait_all_committing(settings, timeout_s=120)
        publish_random_operations(publisher, factory, model, rng, 40, doc_ids, max_pages=4)
        time.sleep(0.3)
        for stage in STAGES:  # mid-run, with batches in flight
            exits[stage] = procs[stage].terminate()
            procs[stage] = StageProcess(stage, settings, tmp_path).start()
        wait_drained(settings, timeout_s=300)
        procs["sink"].terminate()
    finally:
        for proc in procs.values():
            proc.kill()
        publisher.close()
    assert all(t < 30 for t in exits.values()), exits
    _check(settings, model, "sigterm", 0, {f"sigterm_exit_s_{s}": round(t, 2) for s, t in exits.items()})
