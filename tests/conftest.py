"""Shared fixtures: a real Kafka broker for the session, a random topic set per test.

Broker choice, in order: ``KAFKA_BOOTSTRAP_SERVERS`` when set; testcontainers'
Kafka when a Docker engine answers; otherwise the project's own local Apache
Kafka (official jars through Maven), started for the session and stopped after.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from colstream.infra.local_kafka import LocalKafka
from colstream.infra.logs import CHATTY_LIBRARIES
from colstream.infra.settings import ColstreamSettings


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """A test that runs the CLI in-process configures logging for a process: a root handler on the
    stream it had then (CliRunner's, closed after the call) and, with -v, libraries such as torch
    at INFO. Left in place, later records fail on the closed stream; torch's at-exit statistics,
    logged at INFO to the stream pytest captured when torch was imported, print a "Logging error"
    block after the summary. Each test gets back the handlers and levels it started with."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    names = ("", "colstream", "librdkafka", "uvicorn", "uvicorn.access", *CHATTY_LIBRARIES)
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


REPO = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("COLSTREAM_STATE_DIR", REPO / ".colstream" / "test"))
# The broker's and Azurite's files for this test run only: two runs at once (each in its
# own network namespace) never share a data directory. Downloads stay shared under STATE.
SESSION_STATE = STATE / "sessions" / str(os.getpid())


def _docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    import subprocess

    return subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0


def session_broker(state: Path) -> LocalKafka:
    port = int(os.environ.get("COLSTREAM_TEST_KAFKA_PORT", "9092"))
    return LocalKafka(state_dir=state, port=port, controller_port=port + 1)


# Fixtures that start a server process for the session: a test that asks for one by name is
# marked `slow`, so the quick tier stays in-process and the full suite still runs it. (A test
# that reaches the server through request.getfixturevalue carries the mark itself.)
SERVER_FIXTURES = frozenset({"qdrant_url"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def qdrant_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Qdrant server for the session: ``QDRANT_URL``, or the binary next to the checkout."""
    from colstream.testing.qdrant_server import find_qdrant_binary, qdrant_server

    if os.environ.get("QDRANT_URL"):
        yield os.environ["QDRANT_URL"]
        return
    binary = find_qdrant_binary(REPO)
    if binary is None:
        pytest.skip("no Qdrant server: set QDRANT_URL or COLSTREAM_QDRANT_BINARY "
                    "(no package registry ships a Qdrant server binary)")
    with qdrant_server(binary, tmp_path_factory.mktemp("qdrant-server")) as url:
        yield url


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    explicit = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if explicit:
        yield explicit
        return
    if _docker_available():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    broker = session_broker(SESSION_STATE)
    servers = broker.start()
    try:
        yield servers
    finally:
        broker.stop()
        shutil.rmtree(SESSION_STATE / "kafka", ignore_errors=True)


@pytest.fixture(scope="session")
def azurite() -> Iterator[object]:
    """Microsoft's Azurite emulator from npm, installed and started for the session."""
    from colstream.infra.azurite import ensure_azurite, install_azurite

    # Installed once under STATE (npm needs the network); run with this session's data.
    installed = install_azurite(STATE).parents[1]
    session_install = SESSION_STATE / "azurite"
    session_install.mkdir(parents=True, exist_ok=True)
    if not (session_install / "node_modules").exists():
        (session_install / "node_modules").symlink_to(installed)
    handle = ensure_azurite(SESSION_STATE, port=int(os.environ.get("COLSTREAM_AZURITE_PORT", "10000")))
    yield handle
    handle.stop()
    shutil.rmtree(session_install, ignore_errors=True)


@pytest.fixture(scope="session")
def model_cache() -> Path:
    path = STATE / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_colqwen2(model_cache: Path) -> Path:
    from colstream.embedding.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint("colqwen2", model_cache)


@pytest.fixture(scope="session")
def tiny_colpali(model_cache: Path) -> Path:
    from colstream.embedding.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint("colpali", model_cache)


def make_settings(
    tmp_path: Path, bootstrap: str, model_path: Path | None = None, **topic_overrides: int
) -> ColstreamSettings:
    """Settings with a random topic set and consumer groups: tests never see each other's records."""
    run = uuid.uuid4().hex[:8]
    (tmp_path / "blobs").mkdir(parents=True, exist_ok=True)
    names = ("uploads", "pages", "vectors", "indexed", "dlq")
    topics: dict[str, object] = {name: f"t{run}.documents.{name}" for name in names}
    model: dict[str, object] = {"batch_size": 4, "batch_timeout_ms": 50}
    if model_path is not None:
        model["name_or_path"] = str(model_path)
    settings = ColstreamSettings().updated(
        state_dir=tmp_path,
        # A killed member leaves the group after session_timeout_ms; the broker's floor is 6 s.
        kafka={"bootstrap_servers": bootstrap, "linger_ms": 5, "session_timeout_ms": 6_000},
        consumer_group_prefix=f"t{run}-",
        topics={**topics, "partitions": 3, **topic_overrides},
        blob={"local_root": tmp_path / "blobs"},
        qdrant={"path": tmp_path / "qdrant", "url": None},
        model=model,
    )
    return settings


@pytest.fixture
def pipeline_settings(tmp_path: Path, kafka_bootstrap: str, tiny_colqwen2: Path) -> ColstreamSettings:
    from colstream.infra.kafka import ensure_topics

    settings = make_settings(tmp_path, kafka_bootstrap, tiny_colqwen2)
    ensure_topics(settings)
    return settings
