"""Logging for every colstream process: JSON or text, with context and without secrets.

* ``COLSTREAM_LOG__FORMAT=json|text|auto`` (auto: text on a terminal, JSON otherwise);
  JSON lines come from python-json-logger.
* Every line carries ``stage``, plus ``document_id``, ``version`` and ``page`` where
  the code that logs set them with :func:`log_context`. Context lives in
  contextvars; threads that start without it (a stage's worker threads) fall back
  to the stage named by their thread, then to the process's own stage.
* librdkafka logs through the ``librdkafka`` logger (:func:`kafka_logger`, the
  ``logger`` key of a confluent-kafka client), uvicorn's error and access logs
  through ``uvicorn.*``: one handler, one format.
* Secrets never appear: every value held in a ``SecretStr`` of the settings (SASL
  password, API keys, Qdrant key, Azure connection string and SAS token, webhook
  secrets) is replaced by ``***`` in every formatted line, whoever logged it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from pydantic import BaseModel, SecretStr
from pythonjsonlogger.json import JsonFormatter

from colstream.infra.settings import LogSettings

CONTEXT_FIELDS = ("stage", "document_id", "version", "page")
_context: dict[str, contextvars.ContextVar[Any]] = {
    name: contextvars.ContextVar(f"colstream_log_{name}", default=None) for name in CONTEXT_FIELDS
}
_process_stage: str | None = None

# Thread names a stage's own threads carry, mapped to the stage.
_THREAD_STAGES = (
    ("stage-splitter", "splitter"),
    ("stage-embedder", "embedder"),
    ("stage-sink", "sink"),
    ("stage-webhooks", "webhooks"),
    ("splitter", "splitter"),
    ("embed", "embedder"),
    ("sink", "sink"),
    ("webhooks", "webhooks"),
    ("api", "api"),
)

# Libraries that log at INFO about every request; quiet unless asked for (-v).
CHATTY_LIBRARIES = (
    "httpx", "httpcore", "urllib3", "azure", "qdrant_client", "faststream", "multipart",
    "transformers", "torch", "PIL", "filelock", "huggingface_hub", "asyncio", "uvicorn.error",
)
_REDACTED = "***"
# Short values (a test password "x") would blank out ordinary words: not treated as secrets.
_MIN_SECRET_LEN = 4


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Attach ``stage``/``document_id``/``version``/``page`` to every line logged inside."""
    tokens = [(_context[name], _context[name].set(value)) for name, value in fields.items() if name in _context]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def bind_stage(stage: str) -> None:
    """Name the stage of this thread's context (a stage thread calls it once at start)."""
    _context["stage"].set(stage)


def current_stage() -> str | None:
    stage = _context["stage"].get()
    if stage:
        return str(stage)
    name = threading.current_thread().name
    for prefix, thread_stage in _THREAD_STAGES:
        if name.startswith(prefix):
            return thread_stage
    return _process_stage


class ContextFilter(logging.Filter):
    """Adds the context fields to every record (``None`` where they do not apply)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "stage", None):
            record.stage = current_stage() or "cli"
        for name in CONTEXT_FIELDS[1:]:
            if getattr(record, name, None) is None:
                setattr(record, name, _context[name].get())
        return True


def secret_values(settings: BaseModel | None) -> set[str]:
    """Every ``SecretStr`` value anywhere in ``settings`` (nested sections and lists included)."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, SecretStr):
            secret = value.get_secret_value()
            if len(secret) >= _MIN_SECRET_LEN:
                found.add(secret)
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name, None))
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list | tuple | set):
            for item in value:
                walk(item)

    walk(settings)
    return found


class Redactor:
    """Replaces known secrets, raw and as they look inside JSON strings."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._needles: list[str] = []
        self.update(secrets)

    def update(self, secrets: Iterable[str]) -> None:
        needles = set(self._needles)
        for secret in secrets:
            needles.add(secret)
            needles.add(json.dumps(secret)[1:-1])
        # Longest first: a secret that contains another is removed whole.
        self._needles = sorted((n for n in needles if n), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for needle in self._needles:
            if needle in text:
                text = text.replace(needle, _REDACTED)
        return text


REDACTOR = Redactor()

_TEXT_FORMAT = "%(asctime)s %(levelname)-7s [%(stage)s] %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    def __init__(self, redactor: Redactor = REDACTOR) -> None:
        super().__init__(_TEXT_FORMAT)
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        where = " ".join(
            f"{name}={getattr(record, name)}" for name in CONTEXT_FIELDS[1:] if getattr(record, name, None) is not None
        )
        return self.redactor(f"{line} ({where})" if where else line)


class JsonLineFormatter(JsonFormatter):
    """One JSON object per line: time, level, logger, message, context, exception."""

    def __init__(self, redactor: Redactor = REDACTOR) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s %(stage)s %(document_id)s %(version)s %(page)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            json_ensure_ascii=False,
        )
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self.redactor(super().format(record))


def use_json(log_settings: LogSettings, stream: TextIO) -> bool:
    if log_settings.format == "auto":
        isatty = getattr(stream, "isatty", None)
        return not (callable(isatty) and isatty())
    return log_settings.format == "json"


def configure_logging(
    log_settings: LogSettings | None = None,
    *,
    stage: str | None = None,
    verbosity: int = 0,
    settings: BaseModel | None = None,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Install the one root handler (replacing any earlier one) and return it.

    ``verbosity`` 0: colstream at the configured level, libraries at WARNING;
    1 (``-v``): colstream at DEBUG, libraries at INFO; 2+: everything at DEBUG.
    ``settings`` supplies the secrets to redact."""
    global _process_stage
    log_settings = log_settings or LogSettings()
    stream = stream or sys.stderr
    if stage is not None:
        _process_stage = stage
    REDACTOR.update(secret_values(settings))
    handler = logging.StreamHandler(stream)
    as_json = use_json(log_settings, stream)
    handler.setFormatter(JsonLineFormatter() if as_json else TextFormatter())
    if as_json:
        _no_progress_bars()
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_colstream", False):
            root.removeHandler(old)
    handler._colstream = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    base_level = logging.DEBUG if verbosity >= 1 else getattr(logging, log_settings.level)
    root.setLevel(logging.DEBUG if verbosity >= 2 else min(base_level, logging.INFO))
    logging.getLogger("colstream").setLevel(base_level)
    library_level = logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity == 1 else logging.WARNING
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(library_level)
    # uvicorn's access log is one INFO line per request: on unless logging is quieter than INFO.
    access = logging.getLogger("uvicorn.access")
    access.setLevel(logging.INFO if base_level <= logging.INFO else logging.WARNING)
    for name in ("uvicorn", "uvicorn.access", "uvicorn.error", "librdkafka"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("librdkafka").setLevel(logging.INFO if verbosity == 0 else logging.DEBUG)
    logging.captureWarnings(True)
    return handler


def _no_progress_bars() -> None:
    """tqdm bars (model weights loading) would break a stream of JSON lines."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hub = sys.modules.get("huggingface_hub.utils")
    if hub is not None:
        hub.disable_progress_bars()
    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is not None:
        transformers_logging.disable_progress_bar()


def kafka_logger() -> logging.Logger:
    """The logger confluent-kafka clients hand librdkafka's lines to (their ``logger`` key)."""
    return logging.getLogger("librdkafka")
