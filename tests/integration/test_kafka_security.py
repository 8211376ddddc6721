"""Clear failures, fast, against a real broker with a SCRAM-SHA-512 listener and ACLs.

The broker is started here from the same jars as every other test, with its SCRAM users
created when its storage is formatted: ``alice`` (a super user) and ``bob`` (no ACLs).
Each wrong configuration ends with one line on stderr and a non-zero exit within 30 s,
never a hang and never a traceback; an authorization error names the missing ACL.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from colstream.infra.kafka import ensure_topics
from colstream.infra.local_kafka import LocalKafka
from colstream.infra.settings import ColstreamSettings
from tests.conftest import make_settings
from tests.harness import settings_env

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[2]
ALICE_PASSWORD = "alice-s3cret-pw"
BOB_PASSWORD = "bob-s3cret-pw"
BOUND_S = 30.0


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def scram_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    port, controller, sasl = _free_ports(3)
    broker = LocalKafka(state_dir=tmp_path_factory.mktemp("scram-kafka"), port=port, controller_port=controller,
                        sasl_port=sasl, scram_users={"alice": ALICE_PASSWORD, "bob": BOB_PASSWORD},
                        scram_super_user="alice")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def base(tmp_path: Path, scram_broker: LocalKafka) -> ColstreamSettings:
    settings = make_settings(tmp_path, scram_broker.bootstrap_servers)
    ensure_topics(settings)  # over the PLAINTEXT listener, as ANONYMOUS (a super user)
    return settings


def _as(settings: ColstreamSettings, broker: LocalKafka, **kafka: object) -> ColstreamSettings:
    return settings.updated(kafka={"bootstrap_servers": broker.sasl_bootstrap_servers, **kafka})


def _scram(user: str, password: str, **extra: object) -> dict[str, object]:
    return {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": user,
            "sasl_password": password, **extra}


def _env(settings: ColstreamSettings) -> dict[str, str]:
    kafka = settings.kafka
    env = {**settings_env(settings), "COLSTREAM_LOG__FORMAT": "text",
           "COLSTREAM_KAFKA__SECURITY_PROTOCOL": kafka.security_protocol, "COLUMNS": "400"}
    for name, value in (("SASL_MECHANISM", kafka.sasl_mechanism), ("SASL_USERNAME", kafka.sasl_username),
                        ("SASL_PASSWORD", kafka.sasl_password.get_secret_value() if kafka.sasl_password else None)):
        if value:
            env[f"COLSTREAM_KAFKA__{name}"] = value
    return env


def _colstream(settings: ColstreamSettings, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = _env(settings)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "colstream", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=BOUND_S + 30, check=False)
    return proc, time.monotonic() - started


def _one_line_failure(proc: subprocess.CompletedProcess[str], took: float) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert took < BOUND_S, f"took {took:.1f}s"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for secret in (ALICE_PASSWORD, BOB_PASSWORD, "wrong-password"):
        assert secret not in proc.stderr + proc.stdout
    return lines[0]


def test_the_right_credentials_work(base: ColstreamSettings, scram_broker: LocalKafka) -> None:
    settings = _as(base, scram_broker, **_scram("alice", ALICE_PASSWORD))
    proc, _ = _colstream(settings, "topics", "create")
    assert proc.returncode == 0, proc.stderr
    assert f"{settings.topics.dlq}: exists" in proc.stdout
    proc, _ = _colstream(settings, "dlq", "list")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("0 dead letters")


def test_a_wrong_sasl_password_is_one_line(base: ColstreamSettings, scram_broker: LocalKafka) -> None:
    settings = _as(base, scram_broker, **_scram("alice", "wrong-password"))
    line = _one_line_failure(*_colstream(settings, "topics", "create"))
    assert "authentication" in line and "alice" in line and "SCRAM-SHA-512" in line
    assert "COLSTREAM_KAFKA__SASL_PASSWORD" in line


def test_a_wrong_password_stops_a_stage_at_once(base: ColstreamSettings, scram_broker: LocalKafka) -> None:
    settings = _as(base, scram_broker, **_scram("alice", "wrong-password"))
    line = _one_line_failure(*_colstream(settings, "run", "sink"))
    assert "authentication" in line


def test_a_mechanism_mismatch_is_one_line(base: ColstreamSettings, scram_broker: LocalKafka) -> None:
    settings = _as(base, scram_broker, **_scram("alice", ALICE_PASSWORD, sasl_mechanism="PLAIN"))
    line = _one_line_failure(*_colstream(settings, "dlq", "list"))
    assert "PLAIN" in line and ("authentication" in line or "mechanism" in line.lower())


def test_a_plaintext_client_on_the_sasl_listener_does_not_hang(base: ColstreamSettings,
                                                               scram_broker: LocalKafka) -> None:
    settings = _as(base, scram_broker)  # PLAINTEXT, no credentials
    line = _one_line_failure(*_colstream(settings, "dlq", "list"))
    assert scram_broker.sasl_bootstrap_servers in line and "SASL" in line


def test_dlq_list_without_read_permission_names_the_acl(base: ColstreamSettings,
                                                        scram_broker: LocalKafka) -> None:
    settings = _as(base, scram_broker, **_scram("bob", BOB_PASSWORD))
    line = _one_line_failure(*_colstream(settings, "dlq", "list"))
    assert "User:bob" in line and "not authorized" in line
    assert f"--operation Read --topic {settings.topics.dlq}" in line


@pytest.mark.parametrize("granted", ["nothing", "describe only"])
def test_the_read_path_raises_instead_of_spinning(base: ColstreamSettings, scram_broker: LocalKafka,
                                                  granted: str) -> None:
    """With Describe but not Read the metadata and offsets answer and every fetch is refused:
    the loop that skipped errored messages spun there forever."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        AdminClient,
        ResourcePatternType,
        ResourceType,
    )

    from colstream.infra.dead_letters import read_topic
    from colstream.infra.kafka import OutRecord, ProducerClient

    producer = ProducerClient(base)  # ANONYMOUS on the PLAINTEXT listener: a super user
    producer.send(OutRecord(base.topics.dlq, "doc", b"{}"))
    producer.flush_or_raise()
    producer.close()
    settings = _as(base, scram_broker, **_scram("bob", BOB_PASSWORD))
    if granted == "describe only":
        admin = AdminClient(base.kafka.common_config())
        acl = AclBinding(ResourceType.TOPIC, base.topics.dlq, ResourcePatternType.LITERAL, "User:bob", "*",
                         AclOperation.DESCRIBE, AclPermissionType.ALLOW)
        for future in admin.create_acls([acl]).values():
            future.result(timeout=30)
        time.sleep(1.0)  # ACLs reach the authorizer through the metadata log
    started = time.monotonic()
    with pytest.raises(KafkaException) as raised:
        read_topic(settings, settings.topics.dlq)
    assert time.monotonic() - started < BOUND_S
    refused = raised.value.args[0].code()
    assert refused in (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED)
    if granted == "describe only":
        line = _one_line_failure(*_colstream(settings, "dlq", "list"))
        assert "User:bob" in line and "not authorized" in line
        assert (f"--operation Read --topic {settings.topics.dlq}" in line
                or "--group colstream-reader- --resource-pattern-type prefixed" in line), line


def test_doctor_reports_the_refused_topics(base: ColstreamSettings, scram_broker: LocalKafka) -> None:
    settings = _as(base, scram_broker, **_scram("bob", BOB_PASSWORD))
    proc = subprocess.run([sys.executable, "-m", "colstream", "doctor", "--json"], env=_env(settings), cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    checks = {c["name"]: c for c in json.loads(proc.stdout)}
    assert proc.returncode == 1
    assert checks["broker"]["verdict"] == "ok"
    dlq = checks[f"topic {settings.topics.dlq}"]
    assert dlq["verdict"] == "fail" and "User:bob" in dlq["detail"] and "kafka-acls" in dlq["detail"]
