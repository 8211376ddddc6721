"""What every command shares: logging set-up, clean errors, spinners and progress bars.

Output meant for people goes to stdout; logs, spinners and progress bars to stderr,
so ``--json`` output stays parseable. Spinners and bars draw only on a terminal.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import NoReturn, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from colstream.infra.settings import ColstreamSettings, LogSettings

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

T = TypeVar("T")

_verbosity = 0


def setup_logging(settings: ColstreamSettings | None = None, *, stage: str | None = None,
                  verbosity: int | None = None) -> None:
    """Install colstream's one log handler (JSON or text, context fields, secrets redacted).
    Library chatter (httpx, azure, ...) stays at WARNING unless ``-v``."""
    from colstream.infra.logs import configure_logging

    global _verbosity
    if verbosity is not None:
        _verbosity = verbosity
    log_settings: LogSettings | None = settings.log if settings is not None else _log_settings_from_env()
    configure_logging(log_settings, stage=stage, verbosity=_verbosity, settings=settings)
    if stage is None and _verbosity == 0:
        # A command (not a stage): librdkafka's connection chatter is not for people;
        # failures reach them as one line from the command itself.
        import logging

        for name in ("librdkafka", "colstream.kafka"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _log_settings_from_env() -> LogSettings | None:
    try:
        from colstream.app import load_settings

        return load_settings().log
    except Exception:  # invalid settings are reported by the command that reads them
        return None


def connect(settings: ColstreamSettings | None = None, *, start: bool = False,
            wait_for_broker: bool = False) -> ColstreamSettings:
    """Settings naming a broker that answers with these credentials, or a one-line error
    within seconds (wrong password, wrong protocol, nothing listening): never a hang.

    ``wait_for_broker`` (long-running stages): a broker that does not answer yet is waited
    for, with one line each time it is tried again, as a stage started during a broker
    restart must; credentials and protocol mismatches still fail at once."""
    import logging

    from tenacity import Retrying, retry_if_exception_type, wait_exponential

    from colstream.app import load_settings, resolve_broker
    from colstream.infra.kafka_check import BrokerProblem, BrokerUnreachable, check_broker

    settings = resolve_broker(settings or load_settings(), start=start)
    log = logging.getLogger("colstream.cli")
    try:
        if not wait_for_broker:
            check_broker(settings)
            return settings
        for attempt in Retrying(retry=retry_if_exception_type(BrokerUnreachable),
                                wait=wait_exponential(multiplier=1, max=15), reraise=True,
                                before_sleep=lambda state: log.warning(
                                    "%s; trying again", state.outcome.exception() if state.outcome else "")):
            with attempt:
                check_broker(settings)
    except BrokerProblem as exc:
        fail(str(exc))
    return settings


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr and a non-zero exit: no traceback."""
    err_console.print(f"[bold red]error:[/bold red] {message}")
    raise typer.Exit(code)


def _interactive() -> bool:
    return err_console.is_terminal


@contextmanager
def spinner(message: str) -> Iterator[None]:
    """A spinner on stderr while the block runs; nothing off a terminal (logs and pipes stay clean)."""
    if not _interactive():
        yield
        return
    with err_console.status(message):
        yield


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Progress]:
    """A progress bar on stderr; ``advance`` it by hand. Disabled off a terminal."""
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err_console, disable=not _interactive(), transient=False)
    with progress:
        progress.add_task(description, total=total)
        yield progress


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a progress bar."""
    with progress_bar(description, total) as progress:
        task = progress.task_ids[0]
        for item in items:
            yield item
            progress.advance(task)

