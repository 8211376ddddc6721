"""Rendering in worker processes, streamed back in page order.

Why processes: PDFium is not thread-safe, and a hostile file can hang or crash
the renderer. Each worker owns one pipe, so killing a stuck worker cannot
corrupt a queue that the others share.

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
import time
from collections import deque
from collections.abc import Callable, Iterator
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
    PageError,
    PageFailure,
    PlainTarget,
    RenderedPage,
    RenderTargetLike,
    open_document,
    open_session,
)
from colstream.infra.settings import LimitSettings

PageHook = Callable[[int], None]

DEFAULT_CHUNK_PAGES = 8
# After this many timeouts/crashes in a row before any page of the document rendered, the
# document itself is the problem (e.g. it hangs PDFium on open): fail the rest at once.
MAX_FAILURES_BEFORE_FIRST_SUCCESS = 3


def _worker_main(conn: Connection, limits: LimitSettings, page_hook: PageHook | None) -> None:
    # The parent owns shutdown; a Ctrl-C in the terminal must not spray tracebacks from here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        if message[0] == "open":
            _, path, kind = message
            try:
                info = open_document(Path(path), kind, limits)
                conn.send(("opened", info.page_count))
            except DocumentError as exc:
                conn.send(("open_failed", exc.error_type, exc.message))
            except Exception as exc:
                conn.send(("open_failed", "BrokenDocument", f"the document could not be opened: {exc}"))
        elif message[0] == "render":
            _, path, kind, pages, target = message
            _render_chunk(conn, Path(path), kind, pages, target, limits, page_hook)


def _render_chunk(
    conn: Connection,
    path: Path,
    kind: DocumentKind,
    pages: list[int],
    target: PlainTarget,
    limits: LimitSettings,
    page_hook: PageHook | None,
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
            result: RenderedPage | PageFailure
            try:
                if page_hook is not None:
                    page_hook(page_number)
                result = session.render(page_number, target)
            except PageError as exc:
                result = PageFailure(page_number, exc.error_type, exc.message)
            except MemoryError:
                result = PageFailure(page_number, "PageTooLarge", f"page {page_number} ran out of memory")
            except Exception as exc:
                result = PageFailure(page_number, "RenderError", f"page {page_number} failed to render: {exc!r}")
            conn.send(("result", result))
    finally:
        session.close()
    conn.send(("chunk_done",))


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    # Pages of the current chunk not yet reported; empty when idle.
    pending: list[int] = field(default_factory=list)
    current_page: int | None = None
    started_at: float | None = None
    busy: bool = False


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
        page_hook: PageHook | None = None,
    ) -> None:
        """``page_hook`` runs in the worker before each page (fault-injection tests only)."""
        if processes < 1:
            raise ValueError("processes must be >= 1")
        self.processes = processes
        self.limits = limits
        self.chunk_pages = max(1, chunk_pages)
        self.max_outstanding_pages = max(self.chunk_pages, max_outstanding_pages or processes * self.chunk_pages * 2)
        self._context = _make_context(start_method)
        self._page_hook = page_hook
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
            args=(child_conn, self.limits, self._page_hook),
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
        """:func:`open_document` in a worker, so a file that crashes or hangs PDFium cannot take us down."""
        self._require_idle()
        self._fill_pool()
        worker = self._workers[0]
        worker.conn.send(("open", str(path), kind))
        deadline = time.monotonic() + self.limits.render_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._discard(worker)
                raise DocumentError(
                    "OpenTimeout",
                    f"opening the document took longer than {self.limits.render_timeout_s:g}s; "
                    "it is probably malformed",
                )
            ready = wait([worker.conn, worker.process.sentinel], timeout=remaining)
            if worker.conn in ready or worker.conn.poll():
                try:
                    reply = worker.conn.recv()
                except (EOFError, OSError):
                    reply = None
                if reply is not None and reply[0] == "opened":
                    return DocumentInfo(kind, int(reply[1]))
                if reply is not None and reply[0] == "open_failed":
                    raise DocumentError(reply[1], reply[2])
            if not worker.process.is_alive() or worker.process.sentinel in ready:
                exitcode = worker.process.exitcode
                self._discard(worker)
                raise DocumentError(
                    "BrokenDocument", f"the renderer crashed ({_describe_exit(exitcode)}) while opening the document"
                )

    # -- rendering --------------------------------------------------------

    def _require_idle(self) -> None:
        if self._active:
            raise RuntimeError("StreamingRenderer renders one document at a time")

    def render_document(
        self, path: Path, kind: DocumentKind, page_count: int, target: RenderTargetLike
    ) -> Iterator[RenderedPage | PageFailure]:
        """Yield one result per page, in page order, as soon as each is available."""
        self._require_idle()
        self._fill_pool()
        self._active = True
        try:
            yield from self._render(path, kind, page_count, PlainTarget.of(target))
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
                    worker.busy = False
                    worker.current_page = None
                    return True
        except (EOFError, OSError):
            pass
        return False

    def _render(
        self, path: Path, kind: DocumentKind, page_count: int, target: PlainTarget
    ) -> Iterator[RenderedPage | PageFailure]:
        chunk = max(1, min(self.chunk_pages, -(-page_count // self.processes)))
        retry_chunks: deque[list[int]] = deque()
        results: dict[int, RenderedPage | PageFailure] = {}
        next_dispatch = 1
        next_yield = 1
        any_success = False
        failures_without_success = 0
        timeout = self.limits.render_timeout_s

        def take_chunk() -> list[int] | None:
            nonlocal next_dispatch
            if retry_chunks:
                return retry_chunks.popleft()
            if next_dispatch > page_count:
                return None
            size = min(chunk, page_count - next_dispatch + 1)
            if next_dispatch + size - next_yield > self.max_outstanding_pages:
                return None
            pages = list(range(next_dispatch, next_dispatch + size))
            next_dispatch += size
            self.peak_outstanding_pages = max(self.peak_outstanding_pages, next_dispatch - next_yield)
            return pages

        def abandon(worker: _Worker, error_type: str, message: str) -> None:
            """Fail the page the worker was on; send the rest of its chunk elsewhere."""
            nonlocal failures_without_success
            victim = worker.current_page if worker.current_page in worker.pending else None
            if victim is None and worker.pending:
                victim = worker.pending[0]
            leftovers = [p for p in worker.pending if p != victim]
            self._discard(worker)
            self._fill_pool()
            if victim is not None:
                results[victim] = PageFailure(victim, error_type, message.format(page=victim))
                failures_without_success += 1
            if not any_success and failures_without_success >= MAX_FAILURES_BEFORE_FIRST_SUCCESS:
                # Fail everything not yet rendered instead of timing out page after page.
                doomed = [*leftovers, *(p for c in retry_chunks for p in c), *range(next_dispatch, page_count + 1)]
                retry_chunks.clear()
                for page_number in doomed:
                    results[page_number] = PageFailure(
                        page_number,
                        error_type,
                        f"abandoned: the document failed {failures_without_success} times in a row "
                        f"({error_type}) before any page rendered",
                    )
                mark_dispatched(page_count + 1)
            elif leftovers:
                retry_chunks.appendleft(leftovers)

        def mark_dispatched(upto: int) -> None:
            nonlocal next_dispatch
            next_dispatch = max(next_dispatch, upto)

        while next_yield <= page_count:
            if next_yield in results:
                result = results.pop(next_yield)
                next_yield += 1
                yield result
                continue

            for worker in self._workers:
                if worker.busy:
                    continue
                pages = take_chunk()
                if pages is None:
                    break
                try:
                    worker.conn.send(("render", str(path), kind, pages, target))
                except OSError:
                    # Died while idle (killed from outside): nothing was lost but the worker.
                    retry_chunks.appendleft(pages)
                    self._discard(worker)
                    self._fill_pool()
                    break
                worker.busy = True
                worker.pending = list(pages)
                worker.current_page = None
                worker.started_at = time.monotonic()

            busy = [w for w in self._workers if w.busy]
            if not busy:
                raise RuntimeError(f"render stalled at page {next_yield}: no work in flight")  # a bug, not input
            now = time.monotonic()
            wait_for = min(
                (max(0.0, (w.started_at or now) + timeout - now) for w in busy),
                default=timeout,
            )
            ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=wait_for + 0.01))

            for worker in list(busy):
                died = False
                try:
                    while worker.conn.poll():
                        message = worker.conn.recv()
                        kind_of_message = message[0]
                        if kind_of_message == "start":
                            worker.current_page, worker.started_at = message[1], message[2]
                        elif kind_of_message == "result":
                            result = message[1]
                            results[result.page_number] = result
                            if result.page_number in worker.pending:
                                worker.pending.remove(result.page_number)
                            worker.current_page = None
                            if isinstance(result, RenderedPage):
                                any_success = True
                                failures_without_success = 0
                        elif kind_of_message == "chunk_done":
                            worker.busy = False
                            worker.pending = []
                            worker.current_page = None
                            break
                except (EOFError, OSError):
                    died = True
                if not worker.busy:
                    continue
                if died or worker.process.sentinel in ready or not worker.process.is_alive():
                    worker.process.join(timeout=1)
                    abandon(
                        worker,
                        "RendererCrashed",
                        f"the renderer process died ({_describe_exit(worker.process.exitcode)}) "
                        "while rendering page {page}; the other pages were rendered by a fresh process",
                    )
                elif worker.started_at is not None and time.monotonic() - worker.started_at > timeout:
                    abandon(
                        worker,
                        "RenderTimeout",
                        f"page {{page}} took longer than {timeout:g}s to render and was abandoned "
                        "(it is probably pathologically complex)",
                    )


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
    return context
