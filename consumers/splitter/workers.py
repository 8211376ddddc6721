"""Rendering in worker processes, streamed back in page order.

Why processes: PDFium is not thread-safe, and a hostile file can hang or crash
the renderer. Each worker owns one pipe, so killing a stuck worker cannot
corrupt a queue that the others share. Documents are opened only in workers:
:meth:`StreamingRenderer.inspect` counts the pages there, so a file that hangs
or crashes PDFium on open costs one worker and an ``OpenTimeout`` (or
``BrokenDocument``) refusal, never the calling process.

Flow for one document: pages go out in contiguous chunks (a worker opens the
file once per chunk), results come back page by page, and the parent yields
them strictly in page order. Only ``max_outstanding_pages`` pages may be
dispatched and not yet yielded, so memory stays flat however long the document
and however slow the consumer of the iterator is.

A page that runs past ``limits.render_timeout_s`` becomes a ``RenderTimeout``
failure, its worker is killed and replaced, and the rest of its chunk goes to
another worker. A worker that dies (segfault, OOM kill) fails only the page it
was on.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from colstream.consumers.splitter.render import (
    DocumentError,
    DocumentInfo,
    DocumentKind,
    DocumentSession,
    PageError,
    PageFailure,
    PlainTarget,
    RenderedPage,
    RenderTargetLike,
    open_document,
    open_session,
)
from colstream.infra.settings import LimitSettings

RenderResult = RenderedPage | PageFailure

DEFAULT_CHUNK_PAGES = 8
# After this many timeouts/crashes in a row before any page of the document rendered, the
# document itself is the problem (e.g. it hangs PDFium on open): fail the rest at once.
MAX_FAILURES_BEFORE_FIRST_SUCCESS = 3


# ---------------------------------------------------------------------------
# Inside a worker process


def _worker_main(conn: Connection, limits: LimitSettings) -> None:
    # The parent owns shutdown. A Ctrl-C in the terminal, or a SIGTERM to the whole process
    # group (systemd, an init wrapper), must not kill a worker under the parent: its pages
    # would be dead-lettered as RendererCrashed although nothing is wrong with them. The
    # parent drains within its grace and then kills the workers itself; what they had not
    # finished stays uncommitted and is replayed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        if message[0] == "open":
            _, path, kind = message
            conn.send(_inspect_in_worker(Path(path), kind, limits))
        elif message[0] == "render":
            _, path, kind, pages, target = message
            _render_chunk(conn, Path(path), kind, pages, target, limits)


def _inspect_in_worker(path: Path, kind: DocumentKind, limits: LimitSettings) -> tuple[Any, ...]:
    try:
        return ("opened", open_document(path, kind, limits).page_count)
    except DocumentError as exc:
        return ("open_failed", exc.error_type, exc.message)
    except Exception as exc:
        return ("open_failed", "BrokenDocument", f"the document could not be opened: {exc}")


def _render_one(session: DocumentSession, page_number: int, target: PlainTarget) -> RenderResult:
    try:
        return session.render(page_number, target)
    except PageError as exc:
        return PageFailure(page_number, exc.error_type, exc.message)
    except MemoryError:
        return PageFailure(page_number, "PageTooLarge", f"page {page_number} ran out of memory")
    except Exception as exc:
        return PageFailure(page_number, "RenderError", f"page {page_number} failed to render: {exc!r}")


def _render_chunk(
    conn: Connection,
    path: Path,
    kind: DocumentKind,
    pages: list[int],
    target: PlainTarget,
    limits: LimitSettings,
) -> None:
    # Opening counts against the first page's time budget: a file that hangs PDFium on open
    # is caught by the same timeout.
    conn.send(("start", pages[0], time.monotonic()))
    try:
        session = open_session(path, kind, limits)
    except DocumentError as exc:
        for page_number in pages:
            conn.send(("result", PageFailure(page_number, exc.error_type, exc.message)))
        conn.send(("chunk_done",))
        return
    try:
        for index, page_number in enumerate(pages):
            if index:
                conn.send(("start", page_number, time.monotonic()))
            conn.send(("result", _render_one(session, page_number, target)))
    finally:
        session.close()
    conn.send(("chunk_done",))


# ---------------------------------------------------------------------------
# In the parent


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    # Pages of the current chunk not yet reported; empty when idle.
    pending: list[int] = field(default_factory=list)
    current_page: int | None = None
    started_at: float | None = None
    busy: bool = False

    def assign(self, pages: list[int]) -> None:
        self.busy = True
        self.pending = list(pages)
        self.current_page = None
        self.started_at = time.monotonic()

    def finish_chunk(self) -> None:
        self.busy = False
        self.pending = []
        self.current_page = None

    def page_in_flight(self) -> int | None:
        """The page a dead or stuck worker was on (the first pending one before it said)."""
        if self.current_page in self.pending:
            return self.current_page
        return self.pending[0] if self.pending else None


class StreamingRenderer:
    """A pool of render processes; one document at a time, results in page order."""

    def __init__(
        self,
        processes: int,
        limits: LimitSettings,
        *,
        chunk_pages: int = DEFAULT_CHUNK_PAGES,
        max_outstanding_pages: int | None = None,
        start_method: str | None = None,
    ) -> None:
        if processes < 1:
            raise ValueError("processes must be >= 1")
        self.processes = processes
        self.limits = limits
        self.chunk_pages = max(1, chunk_pages)
        self.max_outstanding_pages = max(self.chunk_pages, max_outstanding_pages or processes * self.chunk_pages * 2)
        self._context = _make_context(start_method)
        self._workers: list[_Worker] = []
        self._active = False
        self._closed = False
        # Observability for tests and metrics.
        self.peak_outstanding_pages = 0
        self.workers_replaced = 0

    # -- pool management -------------------------------------------------

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(  # type: ignore[attr-defined]
            target=_worker_main,
            args=(child_conn, self.limits),
            name="colstream-render",
            daemon=True,
        )
        process.start()
        child_conn.close()
        return _Worker(process=process, conn=parent_conn)

    def _fill_pool(self) -> None:
        if self._closed:
            raise RuntimeError("renderer is closed")
        while len(self._workers) < self.processes:
            self._workers.append(self._spawn())

    def _discard(self, worker: _Worker) -> None:
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=5)
        worker.conn.close()
        self._workers.remove(worker)
        self.workers_replaced += 1

    def _replace(self, worker: _Worker) -> None:
        self._discard(worker)
        self._fill_pool()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            with contextlib.suppress(OSError):
                worker.conn.send(None)
        deadline = time.monotonic() + 5
        for worker in self._workers:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5)
            worker.conn.close()
        self._workers.clear()

    def __enter__(self) -> StreamingRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    # -- opening ----------------------------------------------------------

    def inspect(self, path: Path, kind: DocumentKind) -> DocumentInfo:
        """:func:`open_document` in a worker, so a file that crashes or hangs PDFium cannot take us down.

        Raises :class:`DocumentError`: the document's own refusal, ``OpenTimeout`` when opening
        takes longer than ``limits.render_timeout_s`` (the worker is killed and replaced), or
        ``BrokenDocument`` when the worker dies while opening.
        """
        self._require_idle()
        self._fill_pool()
        worker = self._workers[0]
        try:
            worker.conn.send(("open", str(path), kind))
        except OSError:
            # Died while idle (killed from outside): replace it and ask a fresh one.
            self._replace(worker)
            worker = self._workers[-1]
            worker.conn.send(("open", str(path), kind))
        try:
            reply = self._await_open_reply(worker)
        except DocumentError:
            self._replace(worker)
            raise
        if reply[0] == "opened":
            return DocumentInfo(kind, int(reply[1]))
        raise DocumentError(reply[1], reply[2])

    def _await_open_reply(self, worker: _Worker) -> tuple[Any, ...]:
        timeout = self.limits.render_timeout_s
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            ready = wait([worker.conn, worker.process.sentinel], timeout=remaining)
            if worker.conn in ready:
                try:
                    reply: tuple[Any, ...] = worker.conn.recv()
                except (EOFError, OSError):
                    ready.append(worker.process.sentinel)
                else:
                    if reply[0] in ("opened", "open_failed"):
                        return reply
                    continue  # a late message from an earlier, abandoned document
            if worker.process.sentinel in ready:
                worker.process.join(timeout=1)
                raise DocumentError(
                    "BrokenDocument",
                    f"the renderer crashed ({_describe_exit(worker.process.exitcode)}) while opening the document",
                )
        raise DocumentError(
            "OpenTimeout",
            f"opening the document took longer than {timeout:g}s and was abandoned; it is probably malformed",
        )

    # -- rendering --------------------------------------------------------

    def _require_idle(self) -> None:
        if self._active:
            raise RuntimeError("StreamingRenderer renders one document at a time")

    def render_document(
        self, path: Path, kind: DocumentKind, page_count: int, target: RenderTargetLike
    ) -> Iterator[RenderResult]:
        """Yield one result per page, in page order, as soon as each is available."""
        self._require_idle()
        self._fill_pool()
        self._active = True
        try:
            yield from _DocumentRender(self, path, kind, page_count, PlainTarget.of(target)).results()
        finally:
            # Abandoned mid-document (consumer stopped, exception): busy workers would keep
            # rendering pages nobody reads; replace them. Workers that finished keep serving.
            for worker in [w for w in self._workers if w.busy]:
                if worker.pending or not self._await_chunk_done(worker):
                    self._discard(worker)
            self._active = False

    def _await_chunk_done(self, worker: _Worker, grace_s: float = 2.0) -> bool:
        """A worker whose pages are all reported only has its closing message left to send."""
        deadline = time.monotonic() + grace_s
        try:
            while worker.conn.poll(max(0.0, deadline - time.monotonic())):
                if worker.conn.recv()[0] == "chunk_done":
                    worker.finish_chunk()
                    return True
        except (EOFError, OSError):
            pass
        return False


class _DocumentRender:
    """One document's render: which pages are dispatched, which came back, which are yielded.

    Pages ``< next_yield`` are yielded; ``next_yield <= p < next_dispatch`` are out (in a
    worker, in ``retry_chunks``, or in ``done`` waiting for their turn); the rest wait.
    """

    def __init__(
        self, pool: StreamingRenderer, path: Path, kind: DocumentKind, page_count: int, target: PlainTarget
    ) -> None:
        self.pool = pool
        self.path = path
        self.kind = kind
        self.page_count = page_count
        self.target = target
        self.timeout = pool.limits.render_timeout_s
        self.chunk = max(1, min(pool.chunk_pages, -(-page_count // pool.processes)))
        self.retry_chunks: deque[list[int]] = deque()
        self.done: dict[int, RenderResult] = {}
        self.next_dispatch = 1
        self.next_yield = 1
        self.any_success = False
        self.failures_without_success = 0

    def results(self) -> Iterator[RenderResult]:
        while self.next_yield <= self.page_count:
            result = self.done.pop(self.next_yield, None)
            if result is not None:
                self.next_yield += 1
                yield result
                continue
            self._dispatch_to_idle_workers()
            busy = [w for w in self.pool._workers if w.busy]
            if not busy:
                raise RuntimeError(f"render stalled at page {self.next_yield}: no work in flight")  # a bug, not input
            ready = self._wait_for(busy)
            for worker in busy:
                self._collect(worker, ready)

    # -- dispatching -------------------------------------------------------

    def _take_chunk(self) -> list[int] | None:
        if self.retry_chunks:
            return self.retry_chunks.popleft()
        if self.next_dispatch > self.page_count:
            return None
        size = min(self.chunk, self.page_count - self.next_dispatch + 1)
        if self.next_dispatch + size - self.next_yield > self.pool.max_outstanding_pages:
            return None
        pages = list(range(self.next_dispatch, self.next_dispatch + size))
        self.next_dispatch += size
        self.pool.peak_outstanding_pages = max(self.pool.peak_outstanding_pages, self.next_dispatch - self.next_yield)
        return pages

    def _dispatch_to_idle_workers(self) -> None:
        for worker in [w for w in self.pool._workers if not w.busy]:
            pages = self._take_chunk()
            if pages is None:
                return
            try:
                worker.conn.send(("render", str(self.path), self.kind, pages, self.target))
            except OSError:
                # Died while idle (killed from outside): nothing was lost but the worker.
                self.retry_chunks.appendleft(pages)
                self.pool._replace(worker)
                return
            worker.assign(pages)

    # -- collecting --------------------------------------------------------

    def _wait_for(self, busy: list[_Worker]) -> set[Any]:
        """Until a busy worker says something, dies, or the earliest page deadline passes."""
        now = time.monotonic()
        wait_for = min(max(0.0, (w.started_at or now) + self.timeout - now) for w in busy)
        return set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=wait_for + 0.01))

    def _collect(self, worker: _Worker, ready: set[Any]) -> None:
        died = not self._drain(worker)
        if not worker.busy:
            return
        if died or worker.process.sentinel in ready or not worker.process.is_alive():
            worker.process.join(timeout=1)
            self._abandon(
                worker,
                "RendererCrashed",
                f"the renderer process died ({_describe_exit(worker.process.exitcode)}) "
                "while rendering page {page}; the other pages were rendered by a fresh process",
            )
        elif worker.started_at is not None and time.monotonic() - worker.started_at > self.timeout:
            self._abandon(
                worker,
                "RenderTimeout",
                f"page {{page}} took longer than {self.timeout:g}s to render and was abandoned "
                "(it is probably pathologically complex)",
            )

    def _drain(self, worker: _Worker) -> bool:
        """Read everything the worker has sent; False when its pipe broke (it died)."""
        try:
            while worker.busy and worker.conn.poll():
                self._on_message(worker, worker.conn.recv())
        except (EOFError, OSError):
            return False
        return True

    def _on_message(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        if message[0] == "start":
            worker.current_page, worker.started_at = message[1], message[2]
        elif message[0] == "result":
            self._record(worker, message[1])
        elif message[0] == "chunk_done":
            worker.finish_chunk()

    def _record(self, worker: _Worker, result: RenderResult) -> None:
        self.done[result.page_number] = result
        if result.page_number in worker.pending:
            worker.pending.remove(result.page_number)
        worker.current_page = None
        if isinstance(result, RenderedPage):
            self.any_success = True
            self.failures_without_success = 0

    # -- failures ------------------------------------------------------------

    def _abandon(self, worker: _Worker, error_type: str, message: str) -> None:
        """Fail the page the worker was on; send the rest of its chunk elsewhere."""
        victim = worker.page_in_flight()
        leftovers = [p for p in worker.pending if p != victim]
        self.pool._replace(worker)
        if victim is not None:
            self.done[victim] = PageFailure(victim, error_type, message.format(page=victim))
            self.failures_without_success += 1
        if not self.any_success and self.failures_without_success >= MAX_FAILURES_BEFORE_FIRST_SUCCESS:
            self._give_up(leftovers, error_type)
        elif leftovers:
            self.retry_chunks.appendleft(leftovers)

    def _give_up(self, leftovers: list[int], error_type: str) -> None:
        """Fail everything not yet rendered instead of timing out page after page."""
        queued = [p for c in self.retry_chunks for p in c]
        doomed = [*leftovers, *queued, *range(self.next_dispatch, self.page_count + 1)]
        self.retry_chunks.clear()
        for page_number in doomed:
            self.done[page_number] = PageFailure(
                page_number,
                error_type,
                f"abandoned: the document failed {self.failures_without_success} times in a row "
                f"({error_type}) before any page rendered",
            )
        self.next_dispatch = self.page_count + 1


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def _make_context(start_method: str | None) -> BaseContext:
    """forkserver (or spawn): never fork a parent that may hold torch threads or CUDA state."""
    available = multiprocessing.get_all_start_methods()
    method = start_method or ("forkserver" if "forkserver" in available else "spawn")
    context: Any = multiprocessing.get_context(method)
    if method == "forkserver":
        # Workers fork from a server that already imported PDFium and Pillow: fast replacement
        # after a kill. Takes effect only if the server has not started yet; harmless otherwise.
        context.set_forkserver_preload(["colstream.consumers.splitter.render"])
        _start_forkserver_immune_to_group_signals()
    return context


def _start_forkserver_immune_to_group_signals() -> None:
    """Start the forkserver with SIGTERM and SIGINT ignored (dispositions that survive its
    exec), so a signal to the process group does not kill it, and with it every later worker
    start, while the parent is still draining. The parent's own handlers are restored at once."""
    from multiprocessing import forkserver

    if threading.current_thread() is not threading.main_thread():
        forkserver.ensure_running()  # signal.signal works only on the main thread
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        forkserver.ensure_running()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
