"""A real, single-node Apache Kafka (KRaft) for development, tests and the demo.

The official ``org.apache.kafka`` jars are resolved through Maven into a cache
and run with the machine's JDK; nothing here imitates a broker. Kafka's own
console tools run from the same classpath (see :data:`CONSOLE_TOOLS`).

When ``KAFKA_BOOTSTRAP_SERVERS`` is set the project uses that broker and never
starts this one. With Docker available, ``testcontainers`` may start Kafka
instead (see ``tests/conftest.py``).
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

KAFKA_VERSION = os.environ.get("COLSTREAM_KAFKA_VERSION", "4.4.0")

# Kafka 4.x moved the command-line tools into kafka-tools; these are the classes
# behind the familiar kafka-*.sh scripts.
CONSOLE_TOOLS: dict[str, str] = {
    "kafka-console-producer": "org.apache.kafka.tools.ConsoleProducer",
    "kafka-console-consumer": "org.apache.kafka.tools.consumer.ConsoleConsumer",
    "kafka-consumer-groups": "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
    "kafka-topics": "org.apache.kafka.tools.TopicCommand",
    "kafka-configs": "org.apache.kafka.tools.ConfigCommand",
    "kafka-acls": "org.apache.kafka.tools.AclCommand",
    "kafka-get-offsets": "org.apache.kafka.tools.GetOffsetShell",
    "kafka-storage": "kafka.tools.StorageTool",
}


class KafkaRuntimeError(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("COLSTREAM_CACHE_DIR") or str(Path.home() / ".cache" / "colstream")
    return Path(root) / f"kafka-{KAFKA_VERSION}"


def _runtime_file(name: str) -> str:
    return resources.files("colstream.infra").joinpath("kafka_runtime", name).read_text()


def resolve_jars() -> Path:
    """Fetch the broker and tools jars through Maven once; return the lib directory."""
    libs = cache_dir() / "libs"
    marker = libs / ".complete"
    if marker.exists():
        return libs
    if shutil.which("mvn") is None:
        raise KafkaRuntimeError("Maven (`mvn`) is needed to fetch the Apache Kafka jars; install it or set "
                                "KAFKA_BOOTSTRAP_SERVERS to an existing broker")
    work = cache_dir() / "resolve"
    work.mkdir(parents=True, exist_ok=True)
    (work / "pom.xml").write_text(_runtime_file("pom.xml").replace("${kafka.version}", KAFKA_VERSION))
    tmp_libs = cache_dir() / f"libs.tmp.{os.getpid()}"
    proc = subprocess.run(
        ["mvn", "-q", "-B", "dependency:copy-dependencies", f"-DoutputDirectory={tmp_libs}"],
        cwd=work, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise KafkaRuntimeError(
            f"could not resolve org.apache.kafka:kafka_2.13:{KAFKA_VERSION} through Maven:\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    if libs.exists():
        shutil.rmtree(libs)
    tmp_libs.rename(libs)
    marker.write_text(KAFKA_VERSION)
    return libs


def classpath() -> str:
    return os.pathsep.join(str(p) for p in sorted(resolve_jars().glob("*.jar")))


def java_binary() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise KafkaRuntimeError("a Java runtime (17+) is needed to run the local Kafka broker")
    return java


def tool_command(tool: str, args: list[str]) -> list[str]:
    """The argv that runs one of Kafka's own console tools from the cached jars."""
    if tool not in CONSOLE_TOOLS:
        raise KafkaRuntimeError(f"unknown Kafka tool {tool!r}; known: {', '.join(sorted(CONSOLE_TOOLS))}")
    log_conf = cache_dir() / "tools-log4j2.properties"
    if not log_conf.exists():
        log_conf.parent.mkdir(parents=True, exist_ok=True)
        log_conf.write_text(_runtime_file("tools-log4j2.properties"))
    return [
        java_binary(), "-Xmx256m", f"-Dlog4j2.configurationFile={log_conf}",
        "-cp", classpath(), CONSOLE_TOOLS[tool], *args,
    ]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def new_cluster_id(random_bytes: bytes | None = None) -> str:
    """A KRaft cluster id: a base64url-encoded 16-byte UUID, 22 characters.

    base64url uses '-', and an id that starts with it reads as an option to
    kafka-storage, so the first character is always a letter or digit: the
    UUID's first byte is re-drawn until it encodes to one.
    """
    raw = bytearray(random_bytes if random_bytes is not None else uuid.uuid4().bytes)
    while True:
        cluster_id = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
        if cluster_id[0].isalnum():
            return cluster_id
        raw[0] = (raw[0] + 4) % 256


@dataclass
class LocalKafka:
    """The broker's files live under ``state_dir``: data, logs, pid and config."""

    state_dir: Path
    port: int = 9092
    controller_port: int = 9093
    host: str = "localhost"
    # A SASL_PLAINTEXT listener with SCRAM-SHA-512 on this port, its users created when the
    # storage is formatted (``{name: password}``), and ACLs enforced (StandardAuthorizer):
    # the PLAINTEXT listener's ANONYMOUS and ``scram_super_user`` are super users, every
    # other SCRAM user may do only what an ACL grants.
    sasl_port: int | None = None
    scram_users: dict[str, str] = field(default_factory=dict)
    scram_super_user: str | None = None

    @property
    def sasl_bootstrap_servers(self) -> str:
        if self.sasl_port is None:
            raise KafkaRuntimeError("this broker has no SASL listener (sasl_port is not set)")
        return f"{self.host}:{self.sasl_port}"

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def home(self) -> Path:
        return self.state_dir / "kafka"

    @property
    def pid_file(self) -> Path:
        return self.home / "broker.pid"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def is_running(self) -> bool:
        return port_open("127.0.0.1", self.port)

    def live_broker_pid(self) -> int | None:
        """The pid of a broker started from this state dir that is still alive, answering or not.

        The pid file alone could name a recycled pid, so the process must also be ``kafka.Kafka``
        with this state dir's config on its command line.
        """
        pid = self.pid()
        if pid is None:
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        args = [arg.decode(errors="replace") for arg in cmdline]
        return pid if "kafka.Kafka" in args and str(self.home / "server.properties") in args else None

    def _write_config(self) -> Path:
        data_dir = self.home / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        props = self.home / "server.properties"
        listeners = f"PLAINTEXT://:{self.port},CONTROLLER://:{self.controller_port}"
        advertised = f"PLAINTEXT://{self.host}:{self.port}"
        protocols = "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
        sasl: list[str] = []
        if self.sasl_port is not None:
            listeners += f",SASL_PLAINTEXT://:{self.sasl_port}"
            advertised += f",SASL_PLAINTEXT://{self.host}:{self.sasl_port}"
            protocols += ",SASL_PLAINTEXT:SASL_PLAINTEXT"
            supers = ";".join(["User:ANONYMOUS", *([f"User:{self.scram_super_user}"] if self.scram_super_user else [])])
            sasl = [
                "sasl.enabled.mechanisms=SCRAM-SHA-512",
                "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config="
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
                "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                f"super.users={supers}",
                "allow.everyone.if.no.acl.found=false",
            ]
        props.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.bootstrap.servers=localhost:{self.controller_port}",
                    f"listeners={listeners}",
                    f"advertised.listeners={advertised}",
                    "controller.listener.names=CONTROLLER",
                    f"listener.security.protocol.map={protocols}",
                    *sasl,
                    f"log.dirs={data_dir}",
                    "num.partitions=1",
                    "offsets.topic.replication.factor=1",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    # A dev broker that restarts often: rebalance new groups quickly.
                    "group.initial.rebalance.delay.ms=0",
                    "auto.create.topics.enable=false",
                    "message.max.bytes=8388608",
                    "replica.fetch.max.bytes=8388608",
                    "log.cleaner.min.cleanable.ratio=0.1",
                    "log.segment.bytes=67108864",
                ]
            )
            + "\n"
        )
        log_conf = self.home / "log4j2.properties"
        log_conf.write_text(_runtime_file("log4j2.properties"))
        if not (data_dir / "meta.properties").exists():
            cluster_id = self._cluster_id()
            proc = subprocess.run(
                [java_binary(), "-cp", classpath(), "kafka.tools.StorageTool", "format",
                 f"--cluster-id={cluster_id}", "-c", str(props), "--standalone", "--ignore-formatted",
                 *(arg for name, password in self.scram_users.items()
                   for arg in ("--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]"))],
                capture_output=True, text=True, check=False,
            )
            if proc.returncode != 0:
                raise KafkaRuntimeError(f"kafka-storage format failed:\n{proc.stdout}\n{proc.stderr}")
        return props

    def _cluster_id(self) -> str:
        path = self.home / "cluster.id"
        if path.exists():
            return path.read_text().strip()
        cluster_id = new_cluster_id()
        path.write_text(cluster_id)
        return cluster_id

    def start(self, timeout_s: float = 90.0) -> str:
        """Start the broker, or reuse one already answering on the port."""
        if self.is_running():
            return self.bootstrap_servers
        # A second broker on the same data dir must never start: it rewrites the live broker's
        # config and races it for the log dirs (a broker left in another network namespace, where
        # its port cannot be seen, was left spinning a core on its raft thread that way).
        alive = self.live_broker_pid()
        if alive is not None:
            raise KafkaRuntimeError(
                f"a broker started from {self.home} is still running (pid {alive}) but does not answer on "
                f"{self.bootstrap_servers}: it is stopping, or it runs in another network namespace. "
                "Stop it (colstream kafka stop, or kill the pid) or give this run its own state directory."
            )
        self.home.mkdir(parents=True, exist_ok=True)
        props = self._write_config()
        logs = self.home / "logs"
        logs.mkdir(exist_ok=True)
        stdout = open(logs / "stdout.log", "ab")  # noqa: SIM115 - handed to the child process
        proc = subprocess.Popen(
            [
                java_binary(), "-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
                f"-Dkafka.logs.dir={logs}",
                "-cp", classpath(), "kafka.Kafka", str(props),
            ],
            stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the CLI that started it
        )
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise KafkaRuntimeError(
                    f"Kafka exited with {proc.returncode} during start; see {logs / 'stdout.log'}:\n"
                    + (logs / "stdout.log").read_text()[-3000:]
                )
            if self.is_running() and self._metadata_ready():
                return self.bootstrap_servers
            time.sleep(0.5)
        raise KafkaRuntimeError(f"Kafka did not answer on {self.bootstrap_servers} within {timeout_s:.0f}s")

    def _metadata_ready(self) -> bool:
        try:
            from confluent_kafka.admin import AdminClient

            admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
            admin.list_topics(timeout=2)
            return True
        except Exception:
            return False

    def stop(self, timeout_s: float = 30.0) -> bool:
        pid = self.live_broker_pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.live_broker_pid() is None:  # gone, or a zombie its starter has not reaped yet
                break
            time.sleep(0.2)
        else:
            os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True

    def status(self) -> dict[str, object]:
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "running": self.is_running(),
            "pid": self.pid(),
            "kafka_version": KAFKA_VERSION,
            "state_dir": str(self.home),
            "jars": str(cache_dir() / "libs"),
        }

    def write_tool_scripts(self) -> Path:
        """kafka-console-producer & co. as small scripts, the way users know them."""
        bin_dir = self.home / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        for name in CONSOLE_TOOLS:
            script = bin_dir / name
            script.write_text(
                "#!/bin/sh\n"
                f'exec "{sys.executable}" -m colstream kafka tool {name} "$@"\n'
            )
            script.chmod(0o755)
        return bin_dir
