"""The local broker's storage format never reads its cluster id as an option."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import pytest

from colstream.infra import local_kafka
from colstream.infra.local_kafka import LocalKafka, new_cluster_id

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
