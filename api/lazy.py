"""Dependencies opened on first use.

The API starts in well under a second and serves ``/health`` even while Kafka,
Qdrant or the model are unavailable: each dependency is opened on first use
(and retried on the next request if opening failed). Anything passed in by the
caller (``colstream run all`` shares its in-process store; tests pass fakes) is
used as is and never closed here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Lazy(Generic[T]):
    """One shared instance, built on first ``get()``; a failed build is retried next time."""

    def __init__(self, factory: Callable[[], T], *, given: T | None = None) -> None:
        self._factory = factory
        self._value: T | None = given
        self._owned = given is None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def peek(self) -> T | None:
        return self._value

    def get(self) -> T:
        value = self._value
        if value is not None:
            return value
        with self._lock:
            if self._value is None:
                self._value = self._factory()
            return self._value

    def close(self) -> None:
        """Close what this holder opened itself; injected instances belong to the caller."""
        with self._lock:
            value, owned = self._value, self._owned
            if owned:
                self._value = None
        if owned and value is not None:
            closer = getattr(value, "close", None)
            if callable(closer):
                closer()


class LazyProxy:
    """Forwards attribute access to a :class:`Lazy` value, for code that wants the object itself."""

    def __init__(self, lazy: Lazy[Any]) -> None:
        self._lazy = lazy

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lazy.get(), name)
