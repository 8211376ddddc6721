"""SIGTERM in the middle of a long document, against the real broker.

`colstream run all` is stopped while the splitter is still rendering a long PDF and the
embedder is inside its batches, once with the signal sent to the process and once to its
whole process group (as Ctrl-C, systemd or an init wrapper send it, reaching the render
workers and the forkserver too). It must exit within the drain bound without a traceback
and without failing a single page; a restart then completes the document exactly once,
whole: every page indexed, one point per page, no dead letter.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import httpx
import pytest

from colstream.infra.settings import ColstreamSettings
from tests.fixtures.docs import make_pdf
from tests.harness import REPO, dead_letters, kcat_produce, settings_env, upload_line, wait_for
from tests.integration.test_user_flows import on_free_port

pytestmark = pytest.mark.kafka

GRACE_S = 6.0
PAGES = 600
DOCUMENT = "long-report"


def _document(url: str) -> dict | None:
    try:
        response = httpx.get(f"{url}/documents", timeout=5)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return next((row for row in response.json() if row["document_id"] == DOCUMENT), None)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _start(settings: ColstreamSettings, log: Path) -> tuple[subprocess.Popen[bytes], object]:
    env = {**settings_env(settings), "COLSTREAM_API__HOST": "127.0.0.1", "COLSTREAM_SHUTDOWN__GRACE_S": str(GRACE_S),
           "COLSTREAM_MODEL__BATCH_SIZE": "8"}
    out = open(log, "wb")  # noqa: SIM115 - closed by the caller with the process
    # Its own session: the process group a signal to "the group" reaches is exactly run all's.
    proc = subprocess.Popen([sys.executable, "-m", "colstream", "run", "all"], env=env, cwd=REPO, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None or _healthy(settings.api.public_url), 240, what="run all /health")
    except AssertionError:
        proc.kill()
        raise
    assert proc.poll() is None, log.read_text()[-3000:]
    return proc, out


@pytest.mark.parametrize("target", ["process", "group"])
def test_sigterm_mid_document_exits_in_bound_and_the_restart_completes_it_once(
    target: Literal["process", "group"], pipeline_settings: ColstreamSettings, tmp_path: Path
) -> None:
    settings = on_free_port(pipeline_settings)
    url = settings.api.public_url
    pdf = settings.blob.local_root / "long-report.pdf"
    pdf.write_bytes(make_pdf(PAGES))

    first_log = tmp_path / "first.log"
    proc, out = _start(settings, first_log)
    try:
        kcat_produce(settings, settings.topics.uploads, [upload_line(DOCUMENT, pdf.resolve().as_uri())])
        # Mid-document: some pages indexed, most still to render and embed.
        started = wait_for(lambda: (row := _document(url)) is not None and row["indexed_pages"] >= 8 and row, 240,
                           interval_s=0.1, what="first pages indexed")
        assert started["indexed_pages"] < PAGES // 2, f"the document went too fast to stop mid-way: {started}"
        sent = time.monotonic()
        if target == "group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        proc.wait(GRACE_S + 60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.close()  # type: ignore[attr-defined]
    first = first_log.read_text()
    assert took < GRACE_S + 10, f"{took:.1f}s from SIGTERM to exit (grace {GRACE_S}s)"
    assert "Traceback" not in first and "CancelledError" not in first, first[-3000:]
    assert "RendererCrashed" not in first, "a page was failed by the shutdown"

    second_log = tmp_path / "second.log"
    proc, out = _start(settings, second_log)
    try:
        settled = ("complete", "partial", "failed")
        done = wait_for(lambda: (row := _document(url)) is not None and row["state"] in settled and row, 600,
                        what="document settled after the restart")
        stats = httpx.get(f"{url}/stats", timeout=10).json()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(GRACE_S + 60)
        out.close()  # type: ignore[attr-defined]
    assert done["state"] == "complete", done
    assert done["indexed_pages"] == PAGES and done["failed_pages"] == []
    assert stats["total_vectors"] == PAGES  # one point per page: nothing indexed twice
    assert [letter for letter in dead_letters(settings) if letter.get("document_id") == DOCUMENT] == []
