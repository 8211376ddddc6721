"""Composition helpers the CLI shares: which broker, which model, running stages together."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from colstream.infra.local_kafka import LocalKafka, port_open
from colstream.infra.settings import ColstreamSettings

log = logging.getLogger("colstream")


def local_kafka(settings: ColstreamSettings) -> LocalKafka:
    return LocalKafka(state_dir=settings.state_dir)


def resolve_broker(settings: ColstreamSettings, *, start: bool) -> str:
    """An explicit broker always wins; otherwise reuse or start the local one."""
    if settings.kafka.bootstrap_servers:
        return settings.kafka.bootstrap_servers
    broker = local_kafka(settings)
    if port_open("127.0.0.1", broker.port):
        settings.kafka.bootstrap_servers = broker.bootstrap_servers
        return broker.bootstrap_servers
    if not start:
        raise SystemExit(
            "no Kafka broker: set KAFKA_BOOTSTRAP_SERVERS, or run `colstream kafka start` for a local one"
        )
    log.info("starting the local Apache Kafka broker (KRaft) under %s", broker.home)
    settings.kafka.bootstrap_servers = broker.start()
    return settings.kafka.bootstrap_servers


def use_tiny_model(settings: ColstreamSettings) -> Path:
    """Point the model settings at a locally built, randomly initialised checkpoint."""
    from colstream.embedding.tiny import ensure_tiny_checkpoint

    path = ensure_tiny_checkpoint(settings.model.family, settings.state_dir / "models")
    settings.model.name_or_path = str(path)
    log.warning("model: %s tiny checkpoint at %s (RANDOM WEIGHTS, for offline demos and tests)",
                settings.model.family, path)
    return path


@dataclass
class StageThreads:
    """Runs several stage runners in threads of one process (``colstream run all``)."""

    runners: dict[str, object] = field(default_factory=dict)
    threads: dict[str, threading.Thread] = field(default_factory=dict)
    failures: dict[str, BaseException] = field(default_factory=dict)

    def start(self, name: str, runner: object) -> None:
        run: Callable[[], None] = runner.run  # type: ignore[attr-defined]

        def target() -> None:
            try:
                run()
            except BaseException as exc:
                log.exception("stage %s stopped with an error", name)
                self.failures[name] = exc

        thread = threading.Thread(target=target, name=f"stage-{name}", daemon=True)
        self.runners[name] = runner
        self.threads[name] = thread
        thread.start()

    def stop(self, timeout_s: float = 40.0) -> None:
        for runner in self.runners.values():
            runner.request_stop()  # type: ignore[attr-defined]
        for thread in self.threads.values():
            thread.join(timeout_s)

    def stats(self) -> dict[str, object]:
        return {
            name: {
                **runner.stats.as_dict(),  # type: ignore[attr-defined]
                "alive": self.threads[name].is_alive(),
                "error": repr(self.failures[name]) if name in self.failures else None,
            }
            for name, runner in self.runners.items()
        }
