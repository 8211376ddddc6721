"""Stage health (``/livez``, ``/readyz``) and the small HTTP server that serves it with ``/metrics``.

A stage's runner reports three things, each a cheap call on its own thread:

* :meth:`StageHealth.poll_turned` every time the poll loop turns;
* :meth:`StageHealth.batch_started` / :meth:`StageHealth.batch_finished` around
  each batch the handler holds;
* :meth:`StageHealth.assigned` and :meth:`StageHealth.connected` as the consumer's
  partitions and broker connection change.

*Ready* means the consumer holds partitions and reaches the broker. *Live* fails
when the poll loop has not turned for ``health.poll_stall_s``, or a batch has been
in the handler for longer than ``health.max_batch_s``: a hung handler (a wedged GPU,
a PDFium that never returns) would otherwise keep its partitions forever, because
the runner keeps polling while they are paused.

:func:`serve_health` serves every stage registered in this process, with the
Prometheus registry, from ``prometheus_client``'s threading WSGI server.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import REGISTRY, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from colstream.infra.settings import HealthSettings

log = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass
class StageHealth:
    """What one stage's runner reports; read from any thread."""

    stage: str
    settings: HealthSettings = field(default_factory=HealthSettings)
    clock: Clock = time.monotonic
    _last_poll: float | None = None
    _batches: dict[int, float] = field(default_factory=dict)
    _partitions: int = 0
    _connected: bool = False
    _stopped: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- reported by the runner ------------------------------------------------------
    def poll_turned(self) -> None:
        self._last_poll = self.clock()

    def batch_started(self, batch_id: int) -> None:
        with self._lock:
            self._batches[batch_id] = self.clock()

    def batch_finished(self, batch_id: int) -> None:
        with self._lock:
            self._batches.pop(batch_id, None)

    def assigned(self, partitions: int) -> None:
        self._partitions = max(0, partitions)

    def connected(self, up: bool) -> None:
        self._connected = up

    def stopped(self) -> None:
        """A stage that is shutting down stays live (it is draining) but not ready."""
        self._stopped = True

    def on_kafka_error(self, error: Any) -> None:
        """``error_cb``: all brokers down means disconnected until a poll succeeds again."""
        from confluent_kafka import KafkaError

        if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._AUTHENTICATION):
            self._connected = False

    def on_kafka_statistics(self, stats_json: str) -> None:
        """``stats_cb``: connected while at least one broker connection is up."""
        try:
            brokers = json.loads(stats_json).get("brokers") or {}
        except ValueError:
            return
        self._connected = any(b.get("state") == "UP" for b in brokers.values() if b.get("nodeid", -1) >= 0)

    # -- read by the probes ----------------------------------------------------------
    def live(self) -> tuple[bool, str]:
        now = self.clock()
        if self._last_poll is not None and now - self._last_poll > self.settings.poll_stall_s:
            stalled = now - self._last_poll
            return False, f"poll loop has not turned for {stalled:.0f}s (bound {self.settings.poll_stall_s:g}s)"
        with self._lock:
            oldest = min(self._batches.values(), default=None)
        if oldest is not None and now - oldest > self.settings.max_batch_s:
            return False, f"a batch has run for {now - oldest:.0f}s (bound {self.settings.max_batch_s:g}s)"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if self._stopped:
            return False, "stopping"
        if not self._connected:
            return False, "not connected to the broker"
        if self._partitions == 0:
            return False, "no partitions assigned"
        return True, "ok"

    def describe(self) -> dict[str, Any]:
        live, live_reason = self.live()
        ready, ready_reason = self.ready()
        now = self.clock()
        with self._lock:
            oldest = min(self._batches.values(), default=None)
        return {
            "live": live,
            "live_reason": live_reason,
            "ready": ready,
            "ready_reason": ready_reason,
            "partitions": self._partitions,
            "connected": self._connected,
            "batches_in_flight": len(self._batches),
            "oldest_batch_s": round(now - oldest, 1) if oldest is not None else None,
            "since_last_poll_s": round(now - self._last_poll, 1) if self._last_poll is not None else None,
        }


class HealthRegistry:
    """Every stage of this process (one for ``run <stage>``, three for ``run all``)."""

    def __init__(self) -> None:
        self._stages: dict[str, StageHealth] = {}
        self._lock = threading.Lock()

    def register(self, health: StageHealth) -> StageHealth:
        with self._lock:
            self._stages[health.stage] = health
        return health

    def unregister(self, health: StageHealth) -> None:
        with self._lock:
            if self._stages.get(health.stage) is health:
                del self._stages[health.stage]

    def stages(self) -> list[StageHealth]:
        with self._lock:
            return list(self._stages.values())

    def live(self) -> tuple[bool, dict[str, Any]]:
        report = {h.stage: h.describe() for h in self.stages()}
        return all(r["live"] for r in report.values()), report

    def ready(self) -> tuple[bool, dict[str, Any]]:
        report = {h.stage: h.describe() for h in self.stages()}
        return bool(report) and all(r["ready"] for r in report.values()), report


HEALTH = HealthRegistry()


def stage_health(stage: str, settings: HealthSettings) -> StageHealth:
    """A stage's health, registered with this process's :data:`HEALTH`."""
    return HEALTH.register(StageHealth(stage, settings))


def probe_response(ok: bool, report: dict[str, Any]) -> tuple[int, bytes]:
    body = json.dumps({"status": "ok" if ok else "failing", "stages": report}, indent=1).encode()
    return (200 if ok else 503), body


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def health_wsgi_app(registry: HealthRegistry = HEALTH) -> WsgiApp:
    """``/metrics`` (Prometheus text format), ``/livez`` and ``/readyz`` (JSON, 200 or 503)."""
    metrics_app = make_wsgi_app(REGISTRY)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/livez", "/readyz"):
            ok, report = registry.live() if path == "/livez" else registry.ready()
            status, body = probe_response(ok, report)
            start_response(f"{status} {'OK' if status == 200 else 'Service Unavailable'}",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if path == "/metrics":
            return metrics_app(environ, start_response)
        body = b"not found: try /metrics, /livez or /readyz\n"
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: not worth a line
        pass


class HealthPortInUse(RuntimeError):
    """The metrics and probes port is taken."""


@dataclass
class HealthServer:
    host: str
    port: int
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_health(host: str, port: int, registry: HealthRegistry = HEALTH) -> HealthServer:
    """Serve ``/metrics``, ``/livez`` and ``/readyz`` from a daemon thread; ``port=0`` picks one.

    Raises :class:`HealthPortInUse` (one line for a person) when the port is taken."""
    try:
        server = make_server(host, port, health_wsgi_app(registry), ThreadingWSGIServer,
                             handler_class=_QuietHandler)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise HealthPortInUse(
            f"port {port} on {host} is in use: another stage (or process) serves there; give this one "
            "its own COLSTREAM_METRICS__PORT (0 picks a free port)"
        ) from None
    thread = threading.Thread(target=server.serve_forever, name="health-http", daemon=True)
    thread.start()
    actual_port = int(server.server_address[1])
    log.info("serving /metrics, /livez and /readyz on %s:%d", host, actual_port)
    return HealthServer(host, actual_port, server, thread)


# -- background checks of dependencies (the API's /health) -------------------------------
@dataclass
class CheckResult:
    ok: bool | None  # None: not checked yet
    detail: str
    checked_at: float | None

    def age_s(self, now: float) -> float | None:
        return None if self.checked_at is None else round(now - self.checked_at, 1)


class BackgroundChecks:
    """Probes of what a server depends on (Kafka, Qdrant), each run in its own daemon thread.

    :meth:`refresh` starts a probe whose previous run has finished and waits for the answers
    at most ``wait_s``; whatever has not answered by then is reported from its last result,
    with its age, and as failing once it has hung for ``check_timeout_s``. A hung dependency
    holds one thread, never the caller: a health endpoint answers within ``wait_s``."""

    def __init__(self, probes: dict[str, Callable[[], bool]], settings: HealthSettings,
                 clock: Clock = time.monotonic) -> None:
        self.probes = probes
        self.settings = settings
        self.clock = clock
        self._results = {name: CheckResult(None, "not checked yet", None) for name in probes}
        self._running: dict[str, tuple[threading.Thread, float]] = {}
        self._lock = threading.Lock()

    def _start(self, name: str) -> threading.Thread:
        probe = self.probes[name]

        def target() -> None:
            try:
                ok = bool(probe())
                result = CheckResult(ok, "ok" if ok else "unreachable", self.clock())
            except Exception as exc:
                result = CheckResult(False, f"{type(exc).__name__}: {str(exc)[:200]}", self.clock())
            with self._lock:
                self._results[name] = result

        thread = threading.Thread(target=target, name=f"health-check-{name}", daemon=True)
        self._running[name] = (thread, self.clock())
        thread.start()
        return thread

    def refresh(self, wait_s: float) -> dict[str, CheckResult]:
        with self._lock:
            started = [self._start(name) for name in self.probes
                       if name not in self._running or not self._running[name][0].is_alive()]
        deadline = self.clock() + wait_s
        for thread in started:
            thread.join(max(0.0, deadline - self.clock()))
        return self.results()

    def results(self) -> dict[str, CheckResult]:
        now = self.clock()
        with self._lock:
            results = dict(self._results)
            for name, (thread, since) in self._running.items():
                hung_s = now - since
                if thread.is_alive() and hung_s > self.settings.check_timeout_s:
                    last = results[name]
                    results[name] = CheckResult(False, f"no answer for {hung_s:.0f}s (last: {last.detail})",
                                                last.checked_at)
        return results

    def report(self) -> dict[str, dict[str, Any]]:
        now = self.clock()
        return {name: {"ok": r.ok, "detail": r.detail, "age_s": r.age_s(now)} for name, r in self.results().items()}
