"""A zero-downtime model migration under `colstream run all`, against the real broker.

The index starts on tiny ColQwen2; `colstream migrate` moves it to tiny ColPali while a
client keeps searching and uploads and a delete keep arriving: every search answers
200 from exactly one model (old, then new, never mixed), no page is lost, and the
document deleted mid-migration is gone from both indexes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from colstream.infra.settings import ColstreamSettings
from tests.fixtures.docs import make_pdf
from tests.harness import REPO, kcat_produce, settings_env, upload_line, wait_for
from tests.integration.test_user_flows import documents, on_free_port, run_all

pytestmark = pytest.mark.kafka


def migrate(settings: ColstreamSettings, *args: str, ok: bool = True) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "colstream", "migrate", *args], env=settings_env(settings),
                          capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.returncode, proc.stdout + proc.stderr


def migrate_json(settings: ColstreamSettings, *args: str) -> dict[str, Any]:
    _, out = migrate(settings, *args, "--json")
    return dict(json.loads(out[out.index("{"):]))


class Searcher(threading.Thread):
    """Searches without pause, one request at a time, and keeps every answer."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.answers: list[tuple[int, str | None, set[str | None], int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self.halt.is_set():
                response = client.post(f"{self.url}/search", json={"query": "page one", "top_k": 5})
                body = response.json() if response.status_code == 200 else {}
                models = {r.get("model") for r in body.get("results", [])}
                self.answers.append((response.status_code, body.get("model"), models, len(body.get("results", []))))
                time.sleep(0.05)

    def assert_one_model_at_a_time(self, old_model: str, new_model: str) -> None:
        """Every search answered 200 from exactly one model: the old until the cutover, then the new."""
        answers = self.answers
        assert len(answers) >= 10
        assert all(code == 200 for code, _, _, _ in answers), [a for a in answers if a[0] != 200][:3]
        assert all(models <= {model} and count > 0 for _, model, models, count in answers)
        sequence = [model for _, model, _, _ in answers]
        switch = sequence.index(new_model)
        assert set(sequence[:switch]) == {old_model} and set(sequence[switch:]) == {new_model}


def put_pdf(settings: ColstreamSettings, name: str, pages: int) -> str:
    path = settings.blob.local_root / f"{name}.pdf"
    path.write_bytes(make_pdf(pages, text_prefix=name))
    return upload_line(name, path.resolve().as_uri(), filename=f"{name}.pdf")


def test_migration_to_another_model_while_searches_uploads_and_deletes_go_on(
    pipeline_settings: ColstreamSettings, tiny_colpali: Path, tmp_path: Path
) -> None:
    settings = on_free_port(pipeline_settings)
    before = {"alpha": 2, "bravo": 1, "charlie": 3, "delta": 1}
    during = {"echo": 2, "foxtrot": 1}
    after = {"golf": 2}
    with run_all(settings, tmp_path / "run-all.log") as url:
        kcat_produce(settings, settings.topics.uploads, [put_pdf(settings, n, p) for n, p in before.items()])
        wait_for(lambda: all(documents(settings).get(n, {}).get("state") == "complete" for n in before), 180,
                 what="documents indexed by the first model")
        code, out = migrate(settings, "status", ok=False)
        assert code != 0 and "no migration" in out

        searcher = Searcher(url)
        searcher.start()
        wait_for(lambda: len(searcher.answers) >= 3, 60, what="searches before the migration")
        old_model = searcher.answers[-1][1]
        assert old_model and "random weights" in old_model

        # the session's tiny ColPali checkpoint (what --tiny-model builds, without building it again)
        started = migrate_json(settings, "start", "--family", "colpali", "--name-or-path", str(tiny_colpali))
        assert started["phase"] == "backfilling" and started["source"]["model"]["family"] == "colqwen2"
        assert started["target"]["model"]["family"] == "colpali"
        # at once, before any document could be re-embedded: the cutover is refused, with the count
        early_cut = httpx.post(f"{url}/admin/migration/cutover", timeout=60)
        assert early_cut.status_code == 409 and "not complete" in early_cut.json()["detail"]
        assert "documents" in early_cut.json()["detail"] and "--force" in early_cut.json()["detail"]
        code, out = migrate(settings, "start", "--family", "colpali", "--name-or-path", str(tiny_colpali), ok=False)
        assert code != 0 and "backfilling" in out  # one migration at a time

        # uploads and a delete keep arriving mid-migration: both indexes must follow them
        kcat_produce(settings, settings.topics.uploads, [put_pdf(settings, n, p) for n, p in during.items()])
        kcat_produce(settings, settings.topics.uploads, ["bravo|"])
        wait_for(lambda: "bravo" not in documents(settings), 120, what="bravo deleted in the serving index")

        def backfilled() -> dict[str, Any] | None:
            status = migrate_json(settings, "status", "--document-id", "bravo")
            live = set(before) - {"bravo"} | set(during)
            return status if status["complete"] and status["documents"]["total"] == len(live) else None

        early = migrate_json(settings, "status")
        if not early["complete"]:
            code, out = migrate(settings, "cutover", ok=False)
            assert code != 0 and "not complete" in out
        status = wait_for(backfilled, 300, interval_s=1.0, what="backfill complete")
        pages_live = sum(p for n, p in {**before, **during}.items() if n != "bravo")
        assert status["pages"] == {"done": pages_live, "total": pages_live}
        # the document deleted mid-migration is gone from both indexes
        assert status["indexes"]["source"]["document_pages"] == 0
        assert status["indexes"]["target"]["document_pages"] == 0
        assert status["indexes"]["target"]["pages"] == status["indexes"]["source"]["pages"] == pages_live

        cut = migrate_json(settings, "cutover")
        assert cut["phase"] == "cut_over" and cut["serving"] == cut["target"]["name"]
        wait_for(lambda: searcher.answers[-1][1] != old_model, 60, what="search on the new model")
        new_model = searcher.answers[-1][1]
        assert new_model and new_model != old_model and "random weights" in new_model

        # after the cutover new uploads still reach both indexes (until finish)
        kcat_produce(settings, settings.topics.uploads, [put_pdf(settings, n, p) for n, p in after.items()])
        wait_for(lambda: documents(settings).get("golf", {}).get("state") == "complete", 180,
                 what="golf indexed by the new model")
        wait_for(lambda: migrate_json(settings, "status", "--document-id", "golf")["indexes"]["source"]
                 ["document_pages"] == 2, 120, what="golf in the old index too")

        done = migrate_json(settings, "finish")
        assert done["phase"] == "finished" and done["indexes"]["source"]["exists"] is False
        time.sleep(1.0)
        searcher.halt.set()
        searcher.join(120)

        # no page lost: the new index serves every live document, complete
        listed = documents(settings)
        expected = {n: p for n, p in {**before, **during, **after}.items() if n != "bravo"}
        assert set(listed) == set(expected)
        for name, pages in expected.items():
            assert (listed[name]["state"], listed[name]["indexed_pages"]) == ("complete", pages), name
        stats = httpx.get(f"{url}/stats", timeout=10).json()
        assert stats["total_vectors"] == sum(expected.values())
        found = httpx.post(f"{url}/search", json={"query": "alpha", "top_k": 50}, timeout=60).json()
        assert {r["model"] for r in found["results"]} == {new_model}
        assert len(found["results"]) == sum(expected.values())

    searcher.assert_one_model_at_a_time(old_model, new_model)
