"""The drain bound: SIGTERM (to the process or to its whole group) ends a stage within
``shutdown.grace_s`` plus the consumer's close, even with 60 s batches in flight, without
a traceback, leaving the unfinished batches uncommitted; and liveness sees a stuck handler
although the loop keeps polling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from colstream.infra.health import HealthRegistry, serve_health
from colstream.infra.kafka import OutRecord
from colstream.infra.settings import ColstreamSettings
from colstream.infra.stage_runner import Emit, RawRecord, StageRunner
from colstream.testing import InMemoryBroker, wait_until

REPO = Path(__file__).resolve().parents[3]
GRACE_S = 3.0

STAGE_SCRIPT = textwrap.dedent('''
    import sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    from colstream.app import serve_and_run
    from colstream.infra.settings import ColstreamSettings
    from colstream.infra.stage_runner import StageRunner
    from colstream.testing import InMemoryBroker

    class SixtySecondBatches:
        name = "slow"

        def __init__(self):
            # non-daemon worker threads, as a real handler's executor has
            self.pool = ThreadPoolExecutor(max_workers=3)
            self.started = 0
            self.lock = threading.Lock()

        def submit(self, records, emit):
            return self.pool.submit(self.work, list(records))

        def work(self, records):
            with self.lock:
                self.started += 1
                # one write per line: print() writes the newline apart, so lines from two
                # threads could run together and hide a batch from the test
                sys.stdout.write(f"BATCH {self.started} STARTED\\n")
                sys.stdout.flush()
            time.sleep(60)
            return []

        def close(self):
            self.pool.shutdown(wait=True, cancel_futures=True)

    broker = InMemoryBroker()
    broker.create_topic("in")
    for i in range(12):
        broker.append("in", f"doc-{i}", b"x")
    settings = ColstreamSettings().updated(
        kafka={"bootstrap_servers": "in-memory:0"}, shutdown={"grace_s": %(grace)s},
        metrics={"port": 0, "kafka_statistics_interval_ms": 0}, log={"format": "json"})
    from colstream.infra.logs import configure_logging
    configure_logging(settings.log, stage="slow", settings=settings)
    runner = StageRunner(settings, SixtySecondBatches(), topics=["in"], group_id="g", batch_size=2,
                         max_in_flight=3, consumer_factory=broker.consumer, producer_factory=broker.producer)
    code = serve_and_run(runner, settings)
    print("UNREACHABLE when threads linger", code, flush=True)
''') % {"grace": GRACE_S}


@pytest.mark.slow  # a real stage process that drains for the whole grace
@pytest.mark.parametrize("target", ["process", "group"])
def test_sigterm_exits_within_the_grace_with_60s_batches_in_flight(tmp_path: Path, target: str) -> None:
    script = tmp_path / "stage.py"
    script.write_text(STAGE_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        started = 0
        deadline = time.monotonic() + 60
        while started < 3 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            started += line.count("BATCH ")  # two threads' lines may still share one
        assert started == 3, proc.stderr.read() if proc.stderr else ""
        sent = time.monotonic()
        if target == "group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=GRACE_S + 30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert took < GRACE_S + 5, f"{took:.1f}s from SIGTERM to exit"
    assert took >= GRACE_S - 0.5  # it did drain: the batches had their grace
    assert proc.returncode == 0, err
    assert "UNREACHABLE" not in out  # left at once, not after joining the 60 s workers
    assert "Traceback" not in err and "CancelledError" not in err, err
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    messages = " | ".join(str(line["message"]) for line in lines)
    assert "abandoning 3 in-flight batches uncommitted" in messages, messages
    assert "leaving" in messages and "busy threads" in messages
    assert all(line["stage"] == "slow" for line in lines if line["logger"].startswith("colstream"))


class StuckHandler:
    """The first batch never finishes (a wedged GPU); the runner keeps polling meanwhile."""

    name = "stuck"

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.release = threading.Event()

    def submit(self, records: Sequence[RawRecord], emit: Emit) -> Future[list[OutRecord]]:
        return self.pool.submit(self._work)

    def _work(self) -> list[OutRecord]:
        self.release.wait(30)
        return []

    def close(self) -> None:
        self.release.set()
        self.pool.shutdown(wait=True)


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_livez_fails_on_a_stuck_handler_although_the_loop_keeps_polling() -> None:
    broker = InMemoryBroker()
    broker.create_topic("in")
    broker.append("in", "doc-1", b"x")
    settings = ColstreamSettings().updated(
        kafka={"bootstrap_servers": "in-memory:0"}, health={"max_batch_s": 1.0, "poll_stall_s": 5.0},
        shutdown={"grace_s": 1.0}, metrics={"kafka_statistics_interval_ms": 0})
    handler = StuckHandler()
    runner = StageRunner(settings, handler, topics=["in"], group_id="g", consumer_factory=broker.consumer,
                         producer_factory=broker.producer)
    registry = HealthRegistry()
    registry.register(runner.health)
    server = serve_health("127.0.0.1", 0, registry)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        deadline = time.monotonic() + 10
        while _get(f"{base}/readyz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        status, body = _get(f"{base}/livez")
        assert status == 200, body  # the batch has just started
        # Liveness fails once the batch has run past max_batch_s (1 s); poll rather than sleep past it.
        answers: list[tuple[int, dict]] = []

        def livez_fails() -> bool:
            answers.append(_get(f"{base}/livez"))
            return answers[-1][0] == 503

        wait_until(livez_fails, timeout=10, what="/livez failing on the stuck batch")
        status, body = answers[-1]
        report = body["stages"]["stuck"]
        assert status == 503
        assert "a batch has run for" in report["live_reason"]
        assert report["since_last_poll_s"] < 1.0  # the loop is turning: polling alone must not hide it
        assert report["batches_in_flight"] == 1
        handler.release.set()
        deadline = time.monotonic() + 10
        while _get(f"{base}/livez")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _get(f"{base}/livez")[0] == 200
    finally:
        runner.request_stop()
        thread.join(10)
        server.stop()
    assert _get_ready_after_stop(runner) is False


def _get_ready_after_stop(runner: StageRunner) -> bool:
    return runner.health.ready()[0]
