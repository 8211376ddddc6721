"""librdkafka's errors and log lines, rate-limited.

During a broker outage every client reports each failed connection attempt
(``Connect to ipv4#127.0.0.1:9092 failed: Connection refused``) as an error and as
a log line, several times a second per broker and client: thousands of identical
lines a minute. :class:`RateLimitedKafkaLog` passes the first occurrence of each
kind of line at once and folds the repeats within ``interval_s`` into one line
that says how many there were::

    kafka: Connect to ipv4#127.0.0.1:9092 failed: Connection refused (repeated 412 times in 30s)

A "kind" is the line with its numbers blanked (timings, counters and ports vary
from one repeat to the next), so a different error is never hidden behind another.

Every client built through :mod:`colstream.infra.kafka` gets ``error_cb`` and
``logger`` from :func:`kafka_log_config` (one limiter per process).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("colstream.kafka")

DEFAULT_INTERVAL_S = 30.0
# Kinds remembered at once; the least recently seen is forgotten first.
MAX_KINDS = 512

_NUMBERS = re.compile(r"\d+")
# syslog levels librdkafka uses -> logging levels
_SYSLOG_LEVELS = {0: logging.CRITICAL, 1: logging.CRITICAL, 2: logging.CRITICAL, 3: logging.ERROR,
                  4: logging.WARNING, 5: logging.INFO, 6: logging.INFO, 7: logging.DEBUG}


@dataclass
class _Kind:
    first_at: float
    suppressed: int = 0
    last_line: str = ""
    level: int = logging.WARNING


class RateLimitedKafkaLog:
    """``error_cb`` and a librdkafka ``logger`` that emit at most one line per kind per interval."""

    def __init__(
        self,
        logger: logging.Logger = log,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self._kinds: dict[str, _Kind] = {}
        self._lock = threading.Lock()

    # -- the two entry points librdkafka calls

    def error_cb(self, error: Any) -> None:
        """confluent-kafka ``error_cb``: a KafkaError (or anything with ``str()``)."""
        text = error.str() if hasattr(error, "str") else str(error)
        fatal = bool(getattr(error, "fatal", lambda: False)())
        name = error.name() if hasattr(error, "name") else "error"
        self.emit(logging.CRITICAL if fatal else logging.ERROR, f"{name}: {text}")

    def log(self, level: int, msg: str, *args: Any) -> None:
        """What confluent-kafka's ``logger`` receives: ``log(syslog_level, "%s [%s] %s", fac, name, msg)``."""
        try:
            line = msg % args if args else msg
        except (TypeError, ValueError):
            line = " ".join([msg, *map(str, args)])
        self.emit(_SYSLOG_LEVELS.get(level, level if level > 7 else logging.INFO), line)

    # -- the limiter

    def emit(self, level: int, line: str) -> None:
        key = _NUMBERS.sub("#", line)
        now = self.clock()
        out: list[tuple[int, str]] = []
        with self._lock:
            kind = self._kinds.pop(key, None)
            if kind is None:
                kind = _Kind(first_at=now, level=level)
                out.append((level, line))
            elif now - kind.first_at >= self.interval_s:
                out.append((level, self._summary(line, kind, now, including_this=True)))
                kind = _Kind(first_at=now, level=level)
            else:
                kind.suppressed += 1
                kind.last_line, kind.level = line, max(kind.level, level)
            self._kinds[key] = kind  # most recently seen last
            while len(self._kinds) > MAX_KINDS:
                oldest = next(iter(self._kinds))
                dropped = self._kinds.pop(oldest)
                if dropped.suppressed:
                    out.append((dropped.level, self._summary(dropped.last_line, dropped, now)))
        for lvl, text in out:
            self.logger.log(lvl, "kafka: %s", text)

    def flush(self) -> None:
        """Write the counts of repeats not reported yet (at shutdown, or from a timer)."""
        now = self.clock()
        with self._lock:
            pending = [(k.level, self._summary(k.last_line, k, now)) for k in self._kinds.values() if k.suppressed]
            self._kinds.clear()
        for lvl, text in pending:
            self.logger.log(lvl, "kafka: %s", text)

    def _summary(self, line: str, kind: _Kind, now: float, including_this: bool = False) -> str:
        count = kind.suppressed + (1 if including_this else 0)
        return f"{line} (repeated {count} times in {max(now - kind.first_at, 0.0):.0f}s)"


_PROCESS_LIMITER = RateLimitedKafkaLog()


def process_kafka_log() -> RateLimitedKafkaLog:
    return _PROCESS_LIMITER


def kafka_log_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the process's rate-limited ``error_cb`` and ``logger`` unless it sets its own."""
    limiter = process_kafka_log()
    return {"error_cb": limiter.error_cb, "logger": limiter, **config}
