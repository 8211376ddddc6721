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
* :func:`serve_api` serves the REST API over the same settings;
* :func:`run_stage` and :func:`run_all` are ``colstream run <stage>`` and
  ``colstream run all``: metrics, health and the drain bound around them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from colstream.infra.local_kafka import LocalKafka, port_open
from colstream.infra.settings import ColstreamSettings

if TYPE_CHECKING:
    import uvicorn

    from colstream.infra.stage_runner import StageRunner
    from colstream.infra.vectorstore import VectorStore

log = logging.getLogger("colstream")

# The webhooks stage reads documents.indexed and sends signed callbacks; with no
# endpoints configured it commits the events unsent.
StageName = Literal["splitter", "embedder", "sink", "webhooks"]
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

        if store is None:
            # A sink of its own (a Deployment): while a migration is active it writes its own
            # model's index by name, since the alias moves at cutover.
            from colstream.migration.cluster import open_serving_store

            store = open_serving_store(settings)
        return build_sink(settings, store)
    if name == "webhooks":
        from colstream.consumers.webhooks.stage import build_webhooks

        return build_webhooks(settings)
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

    def stop(self, timeout_s: float | None = None) -> None:
        """Ask every stage to stop and wait for them together: each drains within its
        ``shutdown.grace_s``, so the wait is bounded by the largest grace plus a margin."""
        for runner in self.runners.values():
            runner.request_stop()
        if timeout_s is None:
            timeout_s = max((r.shutdown_grace_s for r in self.runners.values()), default=0.0) + 10.0
        deadline = time.monotonic() + timeout_s
        for name, thread in self.threads.items():
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("stage %s still draining after %.0fs; leaving it", name, timeout_s)

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
        store = _migrating_source_store(settings) or open_vector_store(settings.qdrant)
    store.ensure_collections()
    threads = StageThreads()
    for name in stages:
        threads.start(name, build_stage(name, settings, store))
    return Pipeline(settings=settings, store=store, stages=threads)


def _migrating_source_store(settings: ColstreamSettings) -> VectorStore | None:
    """While a migration is active the serving pipeline writes the source index by name: the
    alias moves to the target at cutover (colstream.migration). None: follow the alias."""
    from colstream.migration.core import FileStateStore, pipeline_index, state_file
    from colstream.migration.embedded import index_admin

    source = pipeline_index(FileStateStore(state_file(settings)).load())
    return index_admin(settings.qdrant).open(source) if source is not None else None


def start_migrations(pipeline: Pipeline) -> Any:
    """The migration runtime of ``run all`` (the embedded store, or a Qdrant server that this
    one process serves); resumes a migration the state file records."""
    from colstream.migration.embedded import EmbeddedMigrations

    migrations = EmbeddedMigrations(pipeline)
    migrations.resume()
    pipeline.on_stop.append(migrations.close)
    return migrations


# -- API ------------------------------------------------------------------------------
def api_server(
    settings: ColstreamSettings,
    store: VectorStore | None = None,
    stage_stats: Callable[[], dict[str, object]] | None = None,
    migrations: Any = None,
) -> uvicorn.Server:
    import uvicorn

    from colstream.api.app import create_app
    from colstream.api.auth import KeyRing, bind_host

    # Refuses to start before anything listens: a non-loopback bind needs keys.
    host = bind_host(settings.api, KeyRing.from_settings(settings.api))
    app = create_app(settings, store=store, stage_stats=stage_stats, migrations=migrations)
    mount_observability(app)
    # log_config=None: uvicorn's error and access logs go through colstream's one handler
    # (infra/logs.py), in the same JSON or text format as every other line.
    return uvicorn.Server(uvicorn.Config(app, host=host, port=settings.api.port, log_config=None,
                                         access_log=True))


def mount_observability(app: Any) -> None:
    """``/metrics`` (every stage of this process and the API's HTTP figures), ``/livez`` and
    ``/readyz`` (the stages of this process) on the API, and request metrics for it."""
    from fastapi.responses import JSONResponse, Response
    from starlette.requests import Request

    from colstream.infra.health import HEALTH, probe_response
    from colstream.infra.metrics import observe_http_request, render_latest

    @app.middleware("http")
    async def _count_requests(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            observe_http_request(request.method, template, status, time.perf_counter() - started)

    def metrics() -> Response:
        return Response(render_latest(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def probe(ok_and_report: tuple[bool, dict[str, Any]]) -> JSONResponse:
        status, body = probe_response(*ok_and_report)
        return JSONResponse(json.loads(body), status_code=status)

    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    app.add_api_route("/livez", lambda: probe(HEALTH.live()), methods=["GET"], include_in_schema=False)
    app.add_api_route("/readyz", lambda: probe(HEALTH.ready()), methods=["GET"], include_in_schema=False)


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
    migrations: Any = None,
) -> uvicorn.Server:
    """Serve the API from a daemon thread; set ``should_exit`` on the result to stop it.
    uvicorn leaves signal handling to the main thread when it runs in another one."""
    server = api_server(settings, store, stage_stats, migrations)
    threading.Thread(target=server.run, name="api", daemon=True).start()
    return server


# -- `colstream run <stage>` and `colstream run all` ------------------------------------
def _exit_now(code: int, what: str) -> None:
    """Leave the process now when non-daemon threads are still alive: handler threads still
    working on abandoned batches (a 60 s GPU batch, a hung render) would hold interpreter
    shutdown past the drain bound. Their work is uncommitted, so the group replays it."""
    lingering = [t.name for t in threading.enumerate() if t is not threading.current_thread()
                 and not t.daemon and t.is_alive()]
    if not lingering:
        return
    log.warning("%s: leaving %d busy threads behind at exit (their work is uncommitted and replays): %s",
                what, len(lingering), ", ".join(sorted(lingering)[:8]))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _on_stop_signals(callback: Callable[[], None]) -> None:
    """SIGTERM/SIGINT run ``callback`` once; a second one leaves at once."""
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        if received:
            log.warning("second %s: exiting without draining", signal.Signals(signum).name)
            _exit_now(1, "stop")
        received.append(signum)
        log.info("%s: draining (at most shutdown.grace_s)", signal.Signals(signum).name)
        callback()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def run_stage(name: StageName, settings: ColstreamSettings) -> int:
    """One stage in this process, as its pod runs it: ``/metrics``, ``/livez`` and ``/readyz``
    on ``metrics.port``; on SIGTERM it exits within ``shutdown.grace_s`` plus a few seconds
    of consumer close, whatever the handler is doing."""
    return serve_and_run(build_stage(name, settings), settings,
                         pages_pending=name in ("embedder", "sink"))


def serve_and_run(runner: StageRunner, settings: ColstreamSettings, *, pages_pending: bool = False) -> int:
    """``runner`` until SIGTERM/SIGINT, with ``/metrics``, ``/livez`` and ``/readyz`` served on
    ``metrics.port``; then out of the process within the drain bound (:func:`_exit_now`)."""
    from colstream.infra.health import serve_health
    from colstream.infra.metrics import PagesPendingProbe

    name = runner.handler.name
    server = serve_health(settings.metrics.host, settings.metrics.port)
    probe = PagesPendingProbe(settings, name).start() if pages_pending else None
    _on_stop_signals(runner.request_stop)
    code = 0
    try:
        runner.run()
    except Exception as exc:
        log.error("%s stopped: %s", name, exc, exc_info=not isinstance(exc, KeyboardInterrupt))
        code = 1
    finally:
        if probe is not None:
            probe.stop()
        server.stop()
    _exit_now(code, name)
    return code


def serve_backfill(settings: ColstreamSettings, stages: Sequence[str] | None = None) -> int:
    """A cluster migration's backfill (:func:`colstream.migration.cluster.run_backfill`) until the
    migration no longer needs it, with ``/metrics``, ``/livez`` and ``/readyz`` on ``metrics.port``."""
    from colstream.infra.health import serve_health
    from colstream.migration.cluster import run_backfill
    from colstream.migration.core import BACKFILL_STAGES

    server = serve_health(settings.metrics.host, settings.metrics.port)
    stop = threading.Event()
    _on_stop_signals(stop.set)
    try:
        code = run_backfill(settings, stop=stop, stages=stages or BACKFILL_STAGES)
    finally:
        server.stop()
    _exit_now(code, "backfill")
    return code


def run_all(settings: ColstreamSettings, with_api: bool = True) -> int:
    """Every stage in threads of this process, and the API; ``/metrics``, ``/livez`` and
    ``/readyz`` on the API port (on ``metrics.port`` without the API)."""
    from colstream.infra.health import serve_health
    from colstream.infra.metrics import PagesPendingProbe

    pipeline = start_pipeline(settings)
    settings = pipeline.settings
    probe = PagesPendingProbe(settings, "all").start()
    pipeline.on_stop.append(probe.stop)
    migrations = start_migrations(pipeline)
    if with_api:
        server = serve_api_in_thread(settings, store=pipeline.store, stage_stats=pipeline.stages.stats,
                                     migrations=migrations)
        pipeline.on_stop.append(lambda: setattr(server, "should_exit", True))
        print(f"colstream: pipeline running; API on http://{settings.api.host}:{settings.api.port} "
              "(GET /health, /documents, /metrics, /livez, /readyz). Ctrl-C to stop.", flush=True)
    else:
        health = serve_health(settings.metrics.host, settings.metrics.port)
        pipeline.on_stop.append(health.stop)
        print(f"colstream: pipeline running; /metrics, /livez, /readyz on port {health.port}. Ctrl-C to stop.",
              flush=True)
    stop = threading.Event()
    _on_stop_signals(stop.set)
    while not stop.is_set():
        stop.wait(1.0)
        if pipeline.stages.failures:
            break
    pipeline.stop()
    code = 1 if pipeline.stages.failures else 0
    _exit_now(code, "all")
    return code
