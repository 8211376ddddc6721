"""A model migration on a cluster, against the real broker and a real Qdrant server.

Every piece runs as its own process, as its pod does: the serving splitter, embedder,
sink and API (Deployments), the steps `colstream migrate <step> --cluster` (the step
Jobs) and `colstream migrate backfill` (the backfill Job). The index starts on tiny
ColQwen2 and moves to tiny ColPali while a client keeps searching and uploads and a
delete keep arriving: every search answers 200 from exactly one model, no page is
lost, the document deleted mid-migration is gone from both indexes, the API replica
follows the alias without a restart, the serving stages rolled to the new model after
the cutover keep the new index current, and finish stops the backfill Job.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from colstream.infra.settings import ColstreamSettings
from tests.harness import REPO, StageProcess, kcat_produce, settings_env, wait_for
from tests.integration.test_migration import Searcher, put_pdf
from tests.integration.test_user_flows import free_port

pytestmark = pytest.mark.kafka


def cluster_env(settings: ColstreamSettings, qdrant_url: str, unique: str) -> dict[str, str]:
    return {
        "QDRANT_URL": qdrant_url,
        "COLSTREAM_QDRANT__COLLECTION": f"emb_{unique}",
        "COLSTREAM_QDRANT__RECORDS_COLLECTION": f"docs_{unique}",
        "COLSTREAM_QDRANT__MIGRATIONS_COLLECTION": f"migrations_{unique}",
        "COLSTREAM_QDRANT__ALIAS_FOLLOW_S": "0.5",
        "COLSTREAM_API__HOST": "127.0.0.1",
    }


class Cluster:
    """The pods of one deployment: stage processes by name, and the steps' Jobs."""

    def __init__(self, settings: ColstreamSettings, env: dict[str, str], log_dir: Path, stack: ExitStack) -> None:
        self.settings, self.env, self.log_dir, self.stack = settings, env, log_dir, stack
        self.pods: dict[str, StageProcess] = {}

    def start(self, name: str, *, model_path: Path | None = None, command: tuple[str, ...] | None = None,
              consuming: bool = True) -> StageProcess:
        env = dict(self.env)
        if model_path is not None:
            env.update({"COLSTREAM_MODEL__FAMILY": "colpali", "COLSTREAM_MODEL__NAME_OR_PATH": str(model_path)})
        pod = StageProcess(name, self.settings, self.log_dir, extra_env=env, command=command).start()
        self.stack.callback(pod.kill)
        self.pods[name] = pod
        if consuming:
            pod.wait_consuming(180)
        return pod

    def roll(self, name: str, model_path: Path) -> None:
        """The Deployment rolled to the new model: the old pod stops, a new one starts."""
        assert self.pods[name].terminate(90) < 90
        self.start(name, model_path=model_path)

    def job(self, *args: str, ok: bool = True) -> tuple[int, str]:
        proc = self._job(*args)
        if ok:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.returncode, proc.stdout + proc.stderr

    def job_json(self, *args: str) -> dict[str, Any]:
        proc = self._job(*args, "--json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return dict(json.loads(proc.stdout))

    def _job(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**settings_env(self.settings), **self.env}
        return subprocess.run([sys.executable, "-m", "colstream", "migrate", *args, "--cluster"], env=env,
                              capture_output=True, text=True, timeout=600, cwd=REPO, check=False)


@pytest.fixture
def cluster(pipeline_settings: ColstreamSettings, qdrant_url: str, tmp_path: Path) -> Iterator[Cluster]:
    port = free_port()
    settings = pipeline_settings.updated(api={"port": port, "public_url": f"http://127.0.0.1:{port}"})
    with ExitStack() as stack:
        yield Cluster(settings, cluster_env(settings, qdrant_url, uuid.uuid4().hex[:8]), tmp_path, stack)


def listed(url: str) -> dict[str, dict[str, Any]]:
    return {row["document_id"]: row for row in httpx.get(f"{url}/documents", timeout=30).json()}


def test_a_migration_run_as_jobs_while_the_deployments_serve(cluster: Cluster, tiny_colpali: Path) -> None:
    settings = cluster.settings
    url = settings.api.public_url
    before = {"alpha": 2, "bravo": 1, "charlie": 3}
    during = {"echo": 2}
    after = {"golf": 2}
    for stage in ("splitter", "embedder", "sink"):
        cluster.start(stage)
    api = cluster.start("api", consuming=False)
    wait_for(lambda: _healthy(url) or not api.alive(), 180, what="the API pod")
    assert api.alive(), api.log_tail()

    kcat_produce(settings, settings.topics.uploads, [put_pdf(settings, n, p) for n, p in before.items()])
    wait_for(lambda: all(listed(url).get(n, {}).get("state") == "complete" for n in before), 240,
             what="documents indexed by the first model")
    code, out = cluster.job("status", ok=False)
    assert code != 0 and "no migration" in out

    searcher = Searcher(url)
    searcher.start()
    cluster.stack.callback(searcher.halt.set)  # before the API pod goes
    wait_for(lambda: len(searcher.answers) >= 3, 60, what="searches before the migration")
    old_model = searcher.answers[-1][1]
    assert old_model and "random weights" in old_model

    started = cluster.job_json("start", "--family", "colpali", "--name-or-path", str(tiny_colpali))
    assert started["phase"] == "backfilling" and started["target"]["model"]["family"] == "colpali"
    assert started["serving"] == started["source"]["name"]
    code, out = cluster.job("cutover", ok=False)  # nothing re-embedded yet
    assert code != 0 and "not complete" in out
    backfill = cluster.start("backfill", command=("migrate", "backfill"), consuming=False)

    # uploads and a delete keep arriving mid-migration: both indexes follow them
    kcat_produce(settings, settings.topics.uploads, [put_pdf(settings, n, p) for n, p in during.items()])
    kcat_produce(settings, settings.topics.uploads, ["bravo|"])
    wait_for(lambda: "bravo" not in listed(url), 120, what="bravo deleted in the serving index")
    live = set(before) - {"bravo"} | set(during)

    def backfilled() -> dict[str, Any] | None:
        status = cluster.job_json("status", "--document-id", "bravo")
        return status if status["complete"] and status["documents"]["total"] == len(live) else None

    status = wait_for(backfilled, 360, interval_s=2.0, what="backfill complete")
    assert backfill.alive(), backfill.log_tail()
    pages_live = sum(p for n, p in {**before, **during}.items() if n in live)
    assert status["pages"] == {"done": pages_live, "total": pages_live}
    assert status["indexes"]["source"]["document_pages"] == 0 == status["indexes"]["target"]["document_pages"]

    cut = cluster.job_json("cutover")
    assert cut["phase"] == "cut_over" and cut["serving"] == cut["target"]["name"]
    # the API replica follows the alias by itself: no restart
    wait_for(lambda: searcher.answers[-1][1] != old_model, 60, what="the API on the new model")
    new_model = searcher.answers[-1][1]
    assert new_model and new_model != old_model and "random weights" in new_model
    assert api.alive()

    # the Deployments roll to the new model; the new sink writes the new index by name
    for stage in ("splitter", "embedder", "sink"):
        cluster.roll(stage, tiny_colpali)
    assert "writing " + cut["target"]["name"] + " by name" in cluster.pods["sink"].log_tail(200_000)
    kcat_produce(settings, settings.topics.uploads, [put_pdf(settings, n, p) for n, p in after.items()])
    wait_for(lambda: listed(url).get("golf", {}).get("state") == "complete", 240, what="golf indexed")

    done = cluster.job_json("finish")
    assert done["phase"] == "finished" and done["indexes"]["source"]["exists"] is False
    assert backfill.proc is not None and backfill.proc.wait(120) == 0, backfill.log_tail()
    time.sleep(1.0)
    searcher.halt.set()
    searcher.join(120)

    expected = {n: p for n, p in {**before, **during, **after}.items() if n != "bravo"}
    rows = listed(url)
    assert set(rows) == set(expected)
    for name, pages in expected.items():
        assert (rows[name]["state"], rows[name]["indexed_pages"]) == ("complete", pages), name
    found = httpx.post(f"{url}/search", json={"query": "alpha", "top_k": 50}, timeout=60).json()
    assert {r["model"] for r in found["results"]} == {new_model}
    assert len(found["results"]) == sum(expected.values())

    searcher.assert_one_model_at_a_time(old_model, new_model)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
