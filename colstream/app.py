"""The composition root: the one place that turns settings into running parts.

The CLI, the API server, the tests and the benchmarks all assemble the pipeline
through these functions, so there is exactly one answer to "which broker, which
model, which store, which stage settings":

* :func:`load_settings` resolves the environment once into a frozen object;
* :func:`resolve_broker` and :func:`with_tiny_model` derive the settings a run
  actually uses (the local broker it found or started, a tiny checkpoint);
* :func:`build_stage` wires one stage (core + adapter + runner) from settings;
* :func:`start_pipeline` runs every stage in threads of one process over one
  shared embedded store, as ``colstream run all`` does;
* :func:`serve_api` serves the REST API over the same settings.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

from colstream.infra.local_kafka import LocalKafka, port_open
from colstream.infra.settings import ColstreamSettings

if TYPE_CHECKING:
    import uvicorn

    from colstream.infra.stage_runner import StageRunner
    from colstream.infra.vectorstore import VectorStore

log = logging.getLogger("colstream")

StageName = Literal["splitter", "embedder", "sink"]
PIPELINE_STAGES: tuple[StageName, ...] = get_args(StageName)


def load_settings() -> ColstreamSettings:
    """The environment (``COLSTREAM_*``, ``KAFKA_BOOTSTRAP_SERVERS``, ``QDRANT_URL``), read once."""
    return ColstreamSettings()


# -- what a run uses ------------------------------------------------------------------
def local_kafka(settings: ColstreamSettings) -> LocalKafka:
    return LocalKafka(state_dir=settings.state_dir)


def resolve_broker(settings: ColstreamSettings, *, start: bool) -> ColstreamSettings:
    """Settings that name a broker: an explicit one always wins; otherwise the local
    development broker is reused, or started when ``start`` is set."""
    if settings.kafka.bootstrap_servers:
        return settings
    broker = local_kafka(settings)
    if not port_open("127.0.0.1", broker.port):
        if not start:
            raise SystemExit(
                "no Kafka broker: set KAFKA_BOOTSTRAP_SERVERS, or run `colstream kafka start` for a local one"
            )
        log.info("starting the local Apache Kafka broker (KRaft) under %s", broker.home)
        broker.start()
    return settings.updated(kafka={"bootstrap_servers": broker.bootstrap_servers})


def with_tiny_model(settings: ColstreamSettings) -> ColstreamSettings:
    """Settings whose model is a locally built, randomly initialised checkpoint of the
    configured family: the real ``from_pretrained`` path, offline."""
    from colstream.embedding.tiny import ensure_tiny_checkpoint

    path = ensure_tiny_checkpoint(settings.model.family, settings.state_dir / "models")
    log.warning("model: %s tiny checkpoint at %s (RANDOM WEIGHTS, for offline demos and tests)",
                settings.model.family, path)
    return settings.updated(model={"name_or_path": str(path)})


# -- stages ---------------------------------------------------------------------------
def build_stage(name: StageName, settings: ColstreamSettings, store: VectorStore | None = None) -> StageRunner:
    """One stage, ready to ``run()``. The sink writes to ``store`` when given (the
    embedded store is single-process, so ``run all`` shares one)."""
    if name == "splitter":
        from colstream.consumers.splitter.stage import build_splitter

        return build_splitter(settings)
    if name == "embedder":
        from colstream.consumers.embedder.stage import build_embedder

        return build_embedder(settings)
    if name == "sink":
        from colstream.consumers.sink.stage import build_sink

        return build_sink(settings, store)
    raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(PIPELINE_STAGES)}")


@dataclass
class StageThreads:
    """Stage runners in threads of one process; a stage that dies is recorded, not hidden."""

    runners: dict[str, StageRunner] = field(default_factory=dict)
    threads: dict[str, threading.Thread] = field(default_factory=dict)
    failures: dict[str, BaseException] = field(default_factory=dict)

    def start(self, name: str, runner: StageRunner) -> None:
        def target() -> None:
            try:
                runner.run()
            except BaseException as exc:
                log.exception("stage %s stopped with an error", name)
                self.failures[name] = exc

        thread = threading.Thread(target=target, name=f"stage-{name}", daemon=True)
        self.runners[name] = runner
        self.threads[name] = thread
        thread.start()

    def stop(self, timeout_s: float = 40.0) -> None:
        for runner in self.runners.values():
            runner.request_stop()
        for thread in self.threads.values():
            thread.join(timeout_s)

    def stats(self) -> dict[str, object]:
        return {
            name: {
                **runner.stats.as_dict(),
                "alive": self.threads[name].is_alive(),
                "error": repr(self.failures[name]) if name in self.failures else None,
            }
            for name, runner in self.runners.items()
        }


@dataclass
class Pipeline:
    """Everything ``start_pipeline`` started: the settings it resolved, the shared
    store and the stage threads."""

    settings: ColstreamSettings
    store: VectorStore
    stages: StageThreads
    on_stop: list[Callable[[], None]] = field(default_factory=list)

    def stop(self) -> None:
        for callback in self.on_stop:
            callback()
        self.stages.stop()
        self.store.close()


def start_pipeline(
    settings: ColstreamSettings,
    *,
    stages: tuple[StageName, ...] = PIPELINE_STAGES,
    store: VectorStore | None = None,
) -> Pipeline:
    """Broker (found or started), topics, the store and ``stages`` in this process."""
    from colstream.infra.kafka import ensure_topics
    from colstream.infra.vectorstore import open_vector_store

    settings = resolve_broker(settings, start=True)
    ensure_topics(settings)
    if store is None:
        store = open_vector_store(settings.qdrant)
    store.ensure_collections()
    threads = StageThreads()
    for name in stages:
        threads.start(name, build_stage(name, settings, store))
    return Pipeline(settings=settings, store=store, stages=threads)


# -- API ------------------------------------------------------------------------------
def api_server(
    settings: ColstreamSettings,
    store: VectorStore | None = None,
    stage_stats: Callable[[], dict[str, object]] | None = None,
) -> uvicorn.Server:
    import uvicorn

    from colstream.api.app import create_app
    from colstream.api.auth import KeyRing, bind_host

    # Refuses to start before anything listens: a non-loopback bind needs keys.
    host = bind_host(settings.api, KeyRing.from_settings(settings.api))
    app = create_app(settings, store=store, stage_stats=stage_stats)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=settings.api.port, log_level="warning"))


def serve_api(
    settings: ColstreamSettings,
    store: VectorStore | None = None,
    stage_stats: Callable[[], dict[str, object]] | None = None,
) -> None:
    """Serve the API in this thread until it is told to stop (SIGINT/SIGTERM)."""
    api_server(settings, store, stage_stats).run()


def serve_api_in_thread(
    settings: ColstreamSettings,
    store: VectorStore | None = None,
    stage_stats: Callable[[], dict[str, object]] | None = None,
) -> uvicorn.Server:
    """Serve the API from a daemon thread; set ``should_exit`` on the result to stop it.
    uvicorn leaves signal handling to the main thread when it runs in another one."""
    server = api_server(settings, store, stage_stats)
    threading.Thread(target=server.run, name="api", daemon=True).start()
    return server
