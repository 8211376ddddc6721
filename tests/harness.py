"""Drive the real pipeline the way users do: kcat in, stages running, Qdrant/records out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from colstream.app import PIPELINE_STAGES, StageName
from colstream.infra.settings import ColstreamSettings

REPO = Path(__file__).resolve().parent.parent


def kcat_produce(settings: ColstreamSettings, topic: str, lines: list[str]) -> None:
    """Publish ``key|value`` lines with kcat; an empty value after ``|`` is a tombstone (-Z)."""
    assert settings.kafka.bootstrap_servers
    proc = subprocess.run(
        ["kcat", "-b", settings.kafka.bootstrap_servers, "-P", "-t", topic, "-K", "|", "-Z"],
        input="\n".join(lines) + "\n", text=True, capture_output=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr


def upload_line(document_id: str, blob_uri: str, **extra: Any) -> str:
    return f"{document_id}|" + json.dumps({"document_id": document_id, "blob_uri": blob_uri, **extra})


def read_all(settings: ColstreamSettings, topic: str, timeout_s: float = 10.0) -> list[tuple[str | None, bytes | None]]:
    consumer = Consumer({**settings.kafka.common_config(), "group.id": f"reader-{uuid.uuid4()}",
                         "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {}
        assignment = []
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
                assignment.append(TopicPartition(topic, p, low))
        consumer.assign(assignment)
        out: list[tuple[str | None, bytes | None]] = []
        deadline = time.monotonic() + timeout_s
        while ends and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            key = msg.key()
            out.append((key.decode() if key is not None else None, msg.value()))
            partition, offset = int(msg.partition() or 0), int(msg.offset() or 0)
            if offset + 1 >= ends.get(partition, 0):
                ends.pop(partition, None)
        return out
    finally:
        consumer.close()


def dead_letters(settings: ColstreamSettings) -> list[dict[str, Any]]:
    return [json.loads(v) for _, v in read_all(settings, settings.topics.dlq) if v is not None]


def wait_for(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.25, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what or predicate}: last={last!r}")


@contextmanager
def pipeline_in_threads(settings: ColstreamSettings, stages: tuple[StageName, ...] = PIPELINE_STAGES,
                        store: Any = None) -> Iterator[Any]:
    """The three stages in this process (as `colstream run all` runs them); yields the shared store."""
    from colstream.app import StageThreads, build_stage
    from colstream.infra.vectorstore import open_vector_store

    own_store = store is None
    store = store or open_vector_store(settings.qdrant)
    store.ensure_collections()
    threads = StageThreads()
    try:
        for name in stages:
            threads.start(name, build_stage(name, settings, store))
        yield store
    finally:
        threads.stop()
        assert not threads.failures, threads.failures
        if own_store:
            store.close()


def settings_env(settings: ColstreamSettings) -> dict[str, str]:
    """Environment that reproduces ``settings`` in a child process."""
    env = dict(os.environ)
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers or "",
        "COLSTREAM_STATE_DIR": str(settings.state_dir),
        "COLSTREAM_CONSUMER_GROUP_PREFIX": settings.consumer_group_prefix,
        "COLSTREAM_BLOB__LOCAL_ROOT": str(settings.blob.local_root),
        "COLSTREAM_QDRANT__PATH": str(settings.qdrant.path),
        "COLSTREAM_MODEL__NAME_OR_PATH": settings.model.name_or_path or "",
        "COLSTREAM_MODEL__BATCH_SIZE": str(settings.model.batch_size),
        "COLSTREAM_MODEL__BATCH_TIMEOUT_MS": str(settings.model.batch_timeout_ms),
        "COLSTREAM_KAFKA__LINGER_MS": str(settings.kafka.linger_ms),
        "COLSTREAM_KAFKA__SESSION_TIMEOUT_MS": str(settings.kafka.session_timeout_ms),
        "COLSTREAM_KAFKA__MAX_POLL_INTERVAL_MS": str(settings.kafka.max_poll_interval_ms),
        "COLSTREAM_API__PORT": str(settings.api.port),
        "COLSTREAM_API__PUBLIC_URL": settings.api.public_url,
        "COLSTREAM_LOG_LEVEL": "WARNING",
    })
    for name in ("uploads", "pages", "vectors", "indexed", "dlq"):
        env[f"COLSTREAM_TOPICS__{name.upper()}"] = getattr(settings.topics, name)
    env.pop("QDRANT_URL", None)
    return env


class StageProcess:
    """One stage as its own OS process (`colstream run <stage>`), killable at will."""

    def __init__(self, stage: str, settings: ColstreamSettings, log_dir: Path,
                 instance_id: str | None = None, extra_env: dict[str, str] | None = None,
                 command: tuple[str, ...] | None = None) -> None:
        """``command`` replaces ``run <stage>`` (another long-running colstream command)."""
        self.stage = stage
        self.instance_id = instance_id
        self.extra_env = dict(extra_env or {})
        self.command = command or ("run", stage)
        self.settings = settings
        self.log_path = log_dir / f"{stage}-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StageProcess:
        log = open(self.log_path, "wb")  # noqa: SIM115
        # Several stages share this machine: each serves /metrics on a port of its own.
        env = {**settings_env(self.settings), "COLSTREAM_LOG_LEVEL": "INFO", "COLSTREAM_METRICS__PORT": "0",
               **self.extra_env}
        if self.instance_id:
            env["COLSTREAM_KAFKA__GROUP_INSTANCE_ID"] = self.instance_id
        self.proc = subprocess.Popen([sys.executable, "-m", "colstream", *self.command],
                                     env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        return self

    def wait_consuming(self, timeout_s: float = 120.0) -> None:
        """Until the stage has joined its group and holds partitions (its log says so)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ": assigned [" in self.log_tail(200_000):
                return
            if not self.alive():
                raise AssertionError(f"{self.stage} exited:\n{self.log_tail()}")
            time.sleep(0.1)
        raise AssertionError(f"{self.stage} did not join its group within {timeout_s:.0f}s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self, timeout_s: float = 60.0) -> float:
        """SIGTERM and wait; returns how long the graceful exit took."""
        assert self.proc is not None
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout_s)
        return time.monotonic() - t0

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""
