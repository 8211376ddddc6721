"""The render worker pool: documents are opened only in workers, so a file that hangs or
crashes PDFium on open costs one worker and a refusal with a reason, never the caller."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from colstream.consumers.splitter.render import DocumentError, PlainTarget, RenderedPage
from colstream.consumers.splitter.stage import SplitterHandler
from colstream.consumers.splitter.workers import StreamingRenderer
from colstream.embedding.profile import RenderTarget
from colstream.infra.blobstore import open_blob_store
from colstream.infra.kafka import OutRecord, RecordPosition
from colstream.infra.settings import ColstreamSettings, LimitSettings
from colstream.infra.stage_runner import RawRecord
from tests.fixtures import docs, faults

# Every test here starts render worker processes and most wait out an open timeout: the
# full suite runs them, the quick tier does not.
pytestmark = pytest.mark.slow

COLQWEN2 = PlainTarget(max_pixels=768 * 28 * 28)
# Long enough that rendering a tiny page never hits it on a loaded CI machine.
OPEN_TIMEOUT_S = 5.0


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_a_file_that_hangs_on_open_costs_one_worker_and_an_open_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hangs = _write(tmp_path, "hangs.pdf", docs.make_pdf(2))
    fine = _write(tmp_path, "fine.pdf", docs.make_pdf(3))
    limits = LimitSettings(render_timeout_s=OPEN_TIMEOUT_S)
    faults.inject(monkeypatch, on_open=faults.hang_on_open_of_hangs_files)
    with StreamingRenderer(2, limits) as pool:
        assert pool.inspect(fine, "pdf").page_count == 3
        pids_before = set(pool.worker_pids())
        started = time.monotonic()
        with pytest.raises(DocumentError) as refused:
            pool.inspect(hangs, "pdf")
        assert time.monotonic() - started < OPEN_TIMEOUT_S + 3
        assert refused.value.error_type == "OpenTimeout"
        assert f"took longer than {OPEN_TIMEOUT_S:g}s" in refused.value.message
        # Exactly one worker was killed and replaced; the pool is whole and goes on.
        assert pool.workers_replaced == 1
        assert len(pool.worker_pids()) == 2 and len(set(pool.worker_pids()) - pids_before) == 1
        assert pool.inspect(fine, "pdf").page_count == 3
        results = list(pool.render_document(fine, "pdf", 3, COLQWEN2))
        assert [r.page_number for r in results if isinstance(r, RenderedPage)] == [1, 2, 3]


def test_a_file_that_crashes_the_renderer_on_open_is_refused_and_the_pool_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crash = _write(tmp_path, "crash.pdf", docs.make_pdf(2))
    fine = _write(tmp_path, "fine.pdf", docs.make_pdf(1))
    faults.inject(monkeypatch, on_open=faults.segfault_on_open_of_crash_files)
    with StreamingRenderer(1, LimitSettings()) as pool:
        with pytest.raises(DocumentError) as refused:
            pool.inspect(crash, "pdf")
        assert refused.value.error_type == "BrokenDocument"
        assert "SIGSEGV" in refused.value.message
        assert pool.workers_replaced == 1
        assert pool.inspect(fine, "pdf").page_count == 1


def test_pages_of_a_file_that_hangs_on_open_time_out_instead_of_hanging_the_render(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hangs = _write(tmp_path, "hangs.pdf", docs.make_pdf(4))
    limits = LimitSettings(render_timeout_s=OPEN_TIMEOUT_S)
    faults.inject(monkeypatch, on_open=faults.hang_on_open_of_hangs_files)
    with StreamingRenderer(2, limits, chunk_pages=2) as pool:
        started = time.monotonic()
        results = list(pool.render_document(hangs, "pdf", 4, COLQWEN2))
        assert [r.page_number for r in results] == [1, 2, 3, 4]
        assert {r.error_type for r in results if not isinstance(r, RenderedPage)} == {"RenderTimeout"}
        # Given up after a few timeouts in a row, not one timeout per page in sequence.
        assert time.monotonic() - started < 4 * OPEN_TIMEOUT_S + 3


def _record(key: str, value: dict[str, object], offset: int) -> RawRecord:
    return RawRecord(key=key, value=json.dumps(value).encode(), position=RecordPosition("uploads", 0, offset))


def test_the_splitter_dead_letters_a_file_that_hangs_on_open_and_splits_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = ColstreamSettings().updated(
        state_dir=tmp_path, blob={"local_root": tmp_path / "blobs"}, limits={"render_timeout_s": OPEN_TIMEOUT_S}
    )
    (tmp_path / "blobs").mkdir()
    hangs = _write(tmp_path / "blobs", "hangs.pdf", docs.make_pdf(2))
    fine = _write(tmp_path / "blobs", "fine.pdf", docs.make_pdf(2))
    faults.inject(monkeypatch, on_open=faults.hang_on_open_of_hangs_files)
    renderer = StreamingRenderer(1, settings.limits)
    handler = SplitterHandler(settings, open_blob_store(settings), renderer, RenderTarget(max_pixels=200_000))
    emitted: list[OutRecord] = []
    try:
        handler.split(_record("bad", {"document_id": "bad", "blob_uri": hangs.as_uri()}, 7), emitted.append)
        handler.split(_record("good", {"document_id": "good", "blob_uri": fine.as_uri()}, 8), emitted.append)
    finally:
        handler.close()
    dlq = [json.loads(r.value or b"") for r in emitted if r.topic == settings.topics.dlq]
    pages = [json.loads(r.value or b"") for r in emitted if r.topic == settings.topics.pages]
    assert [(d["document_id"], d["error_type"]) for d in dlq] == [("bad", "OpenTimeout")]
    assert "took longer than" in dlq[0]["message"]
    assert [(p["type"], p["document"]["document_id"]) for p in pages] == [
        ("document_failed", "bad"), ("page", "good"), ("page", "good")
    ]
    assert pages[0]["error_type"] == "OpenTimeout"
    assert renderer.workers_replaced == 1


GROUP_SIGTERM_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
from colstream.consumers.splitter.workers import StreamingRenderer
from colstream.infra.settings import LimitSettings
from tests.fixtures import docs

got = []
signal.signal(signal.SIGTERM, lambda *_: got.append("TERM"))
path = Path(sys.argv[1])
path.write_bytes(docs.make_pdf(2))
with StreamingRenderer(2, LimitSettings()) as pool:
    assert pool.inspect(path, "pdf").page_count == 2
    workers = set(pool.worker_pids())
    from multiprocessing import forkserver
    server = forkserver._forkserver._forkserver_pid
    os.killpg(os.getpgrp(), signal.SIGTERM)
    time.sleep(1.0)
    for pid in [*workers, server]:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state != "Z", f"{pid} was killed by the group's SIGTERM"
    assert got == ["TERM"], got
    assert pool.inspect(path, "pdf").page_count == 2
    assert set(pool.worker_pids()) == workers and pool.workers_replaced == 0
print("SURVIVED")
"""


def test_a_sigterm_to_the_process_group_leaves_workers_and_forkserver_to_the_parent(tmp_path: Path) -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[4]
    proc = subprocess.run([sys.executable, "-c", GROUP_SIGTERM_SCRIPT, str(tmp_path / "doc.pdf")], cwd=repo,
                          capture_output=True, text=True, timeout=120, start_new_session=True, check=False)
    assert proc.returncode == 0 and "SURVIVED" in proc.stdout, proc.stdout + proc.stderr
