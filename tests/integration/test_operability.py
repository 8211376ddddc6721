"""`colstream run all` as an on-call engineer sees it, against the real broker: /metrics parses
with prometheus_client's parser and its counters move as documents flow, /livez and /readyz
answer, every log line is JSON with a stage, the API's access log comes out in the same
format, no secret of the settings ever appears, and SIGTERM ends it within the drain bound."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from colstream.infra.settings import ColstreamSettings
from tests.fixtures.docs import make_pdf
from tests.harness import REPO, kcat_produce, settings_env, upload_line, wait_for
from tests.integration.test_user_flows import on_free_port

pytestmark = pytest.mark.kafka

SECRETS = {
    "COLSTREAM_KAFKA__SASL_PASSWORD": "kafka-sasl-secret-3141",
    "COLSTREAM_EVENTGRID__SHARED_SECRET": "eventgrid-shared-secret-2718281828",
    "COLSTREAM_BLOB__AZURE_SAS_TOKEN": "sv=2026-01-01&sig=sas-secret-1618033",
}
GRACE_S = 8.0


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _documents(url: str) -> dict[str, dict]:
    try:
        response = httpx.get(f"{url}/documents", timeout=5)
    except httpx.HTTPError:
        return {}
    return {row["document_id"]: row for row in response.json()} if response.status_code == 200 else {}


def test_run_all_metrics_probes_json_logs_and_drain(pipeline_settings: ColstreamSettings, tmp_path: Path) -> None:
    settings = on_free_port(pipeline_settings)
    url = settings.api.public_url
    env = {**settings_env(settings), "COLSTREAM_API__HOST": "127.0.0.1", "COLSTREAM_LOG__FORMAT": "json",
           "COLSTREAM_SHUTDOWN__GRACE_S": str(GRACE_S), "COLSTREAM_METRICS__PENDING_INTERVAL_S": "1",
           "COLSTREAM_LOG_LEVEL": "INFO", **SECRETS}
    stderr_path, stdout_path = tmp_path / "stderr.log", tmp_path / "stdout.log"
    with open(stderr_path, "wb") as err, open(stdout_path, "wb") as out:
        # -v: colstream at DEBUG and libraries at INFO, the most a run logs
        proc = subprocess.Popen([sys.executable, "-m", "colstream", "-v", "run", "all"], env=env, cwd=REPO,
                                stdout=out, stderr=err)
        try:
            try:
                wait_for(lambda: proc.poll() is not None or _healthy(url), 240, what="run all /health")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{stderr_path.read_text()[-3000:]}") from None
            assert proc.poll() is None, stderr_path.read_text()[-3000:]
            before = _metrics(url)
            pages = {"ops-one": 1, "ops-four": 4}
            lines = []
            for name, count in pages.items():
                path = settings.blob.local_root / f"{name}.pdf"
                path.write_bytes(make_pdf(count))
                lines.append(upload_line(name, path.resolve().as_uri(), filename=f"{name}.pdf"))
            kcat_produce(settings, settings.topics.uploads, lines)
            wait_for(lambda: all(_documents(url).get(n, {}).get("state") == "complete" for n in pages), 180,
                     what="documents complete")
            after = _metrics(url)
            assert httpx.get(f"{url}/livez", timeout=5).status_code == 200
            ready = httpx.get(f"{url}/readyz", timeout=5)
            assert ready.status_code == 200, ready.text
            assert set(ready.json()["stages"]) >= {"splitter", "embedder", "sink"}
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(GRACE_S + 30)
            took = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def moved(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert moved("colstream_records_consumed_total", stage="splitter") == 2
    assert moved("colstream_records_produced_total", stage="splitter") >= 5  # five pages emitted
    assert moved("colstream_records_consumed_total", stage="embedder") == 5
    assert moved("colstream_records_consumed_total", stage="sink") >= 5
    assert moved("colstream_pages_indexed_total", stage="sink") == 5
    assert moved("colstream_batch_seconds_count", stage="embedder") >= 1
    assert moved("colstream_embed_forward_seconds_count", stage="embedder") >= 1
    assert moved("colstream_sink_write_seconds_count", stage="sink") >= 1
    assert moved("colstream_http_requests_total", stage="api", method="GET", route="/documents", status="200") >= 1
    assert ("colstream_pages_pending", (("stage", "all"),)) in after

    assert proc.returncode == 0
    assert took < GRACE_S + 10, f"{took:.1f}s from SIGTERM to exit"
    stderr, stdout = stderr_path.read_text(), stdout_path.read_text()
    for secret in SECRETS.values():
        assert secret not in stderr and secret not in stdout
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]  # every line parses
    assert records
    assert all(r.get("stage") for r in records)
    assert "Traceback" not in stderr
    access = [r for r in records if r["logger"] == "uvicorn.access"]
    assert any("/documents" in r["message"] for r in access), "no access log"
    assert {r["stage"] for r in records} >= {"splitter", "embedder", "sink"}


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_stage_run_alone_serves_metrics_and_probes_on_the_metrics_port(
    pipeline_settings: ColstreamSettings, tmp_path: Path
) -> None:
    from tests.integration.test_user_flows import free_port

    settings = pipeline_settings
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**settings_env(settings), "COLSTREAM_METRICS__PORT": str(port), "COLSTREAM_METRICS__HOST": "127.0.0.1",
           "COLSTREAM_LOG__FORMAT": "json", "COLSTREAM_SHUTDOWN__GRACE_S": str(GRACE_S)}
    with open(tmp_path / "splitter.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "colstream", "run", "splitter"], env=env, cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: proc.poll() is not None or _status(f"{base}/readyz") == 200, 120, what="/readyz")
            assert proc.poll() is None, (tmp_path / "splitter.log").read_text()[-3000:]
            assert _status(f"{base}/livez") == 200
            path = settings.blob.local_root / "alone.pdf"
            path.write_bytes(make_pdf(3))
            kcat_produce(settings, settings.topics.uploads, [upload_line("alone", path.resolve().as_uri())])
            wait_for(lambda: _value(_metrics(base), "colstream_records_produced_total", stage="splitter") >= 3, 120,
                     what="three pages produced")
            samples = _metrics(base)
            assert _value(samples, "colstream_records_consumed_total", stage="splitter") == 1
            assert _value(samples, "colstream_batch_seconds_count", stage="splitter") >= 1
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(GRACE_S + 30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = [json.loads(line) for line in (tmp_path / "splitter.log").read_text().splitlines() if line.strip()]
    assert all(line["stage"] for line in lines)


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0
