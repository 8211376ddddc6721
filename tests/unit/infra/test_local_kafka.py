"""The local broker's storage format never reads its cluster id as an option."""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from colstream.infra import local_kafka
from colstream.infra.local_kafka import LocalKafka, new_cluster_id
from colstream.testing import wait_until

DASH_FIRST = bytes([0xF8]) + bytes(range(15))  # encodes to "-..." in base64url


def test_dash_first_bytes_encode_to_an_id_that_starts_with_a_dash() -> None:
    assert base64.urlsafe_b64encode(DASH_FIRST).decode().startswith("-")


@pytest.mark.parametrize("first", range(256))
def test_cluster_ids_never_start_with_a_dash(first: int) -> None:
    cluster_id = new_cluster_id(bytes([first]) + bytes(range(15)))
    assert len(cluster_id) == 22 and cluster_id[0].isalnum()
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_storage_format_passes_the_id_as_one_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_run(argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(local_kafka.subprocess, "run", fake_run)
    monkeypatch.setattr(local_kafka, "classpath", lambda: "cp")
    monkeypatch.setattr(local_kafka, "java_binary", lambda: "java")
    monkeypatch.setattr(local_kafka.uuid, "uuid4", lambda: type("U", (), {"bytes": DASH_FIRST})())
    broker = LocalKafka(state_dir=tmp_path, port=19092, controller_port=19093)
    broker.home.mkdir(parents=True)
    broker._write_config()
    [argv] = calls
    [given] = [arg for arg in argv if arg.startswith("--cluster-id")]
    cluster_id = given.split("=", 1)[1]
    assert given == f"--cluster-id={cluster_id}" and not cluster_id.startswith("-")
    assert "-t" not in argv


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def unseen_broker(tmp_path: Path) -> LocalKafka:
    """A local broker's state dir on ports nothing answers on, as a broker in another namespace looks."""
    broker = LocalKafka(state_dir=tmp_path, port=_free_port(), controller_port=_free_port())
    broker.home.mkdir(parents=True)
    return broker


@contextmanager
def process_in_pid_file(broker: LocalKafka, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """A live process named by the broker's pid file, whose command line carries ``args`` (as a
    broker's names its main class and config); killed at the end."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *args])
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        wait_until(lambda: cmdline.read_bytes().split(b"\0")[-2:-1] == [args[-1].encode()], timeout=10)
        broker.pid_file.write_text(str(proc.pid))
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_live_broker_on_the_same_state_dir_that_does_not_answer_is_refused_before_any_file_is_written(
    unseen_broker: LocalKafka,
) -> None:
    props = unseen_broker.home / "server.properties"
    props.write_text("the live broker's config\n")
    with (
        process_in_pid_file(unseen_broker, "kafka.Kafka", str(props)) as other,
        pytest.raises(local_kafka.KafkaRuntimeError, match=rf"still running \(pid {other.pid}\).*namespace"),
    ):
        unseen_broker.start(timeout_s=5)
    assert props.read_text() == "the live broker's config\n"
    assert not (unseen_broker.home / "data").exists()


def test_a_recycled_pid_is_not_taken_for_the_broker_and_is_never_killed(unseen_broker: LocalKafka) -> None:
    with process_in_pid_file(unseen_broker, "not-a-broker") as stranger:
        assert unseen_broker.pid() == stranger.pid and unseen_broker.live_broker_pid() is None
        assert unseen_broker.stop(timeout_s=1) is False
        assert stranger.poll() is None


def test_stop_ends_the_broker_process_and_forgets_its_pid(unseen_broker: LocalKafka) -> None:
    config = str(unseen_broker.home / "server.properties")
    with process_in_pid_file(unseen_broker, "kafka.Kafka", config) as fake:
        assert unseen_broker.live_broker_pid() == fake.pid
        assert unseen_broker.stop(timeout_s=5) is True
        assert fake.wait(timeout=5) != 0 and not unseen_broker.pid_file.exists()
