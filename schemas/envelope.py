"""Where a record came from travels beside its payload, never inside it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RecordPosition:
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Envelope(Generic[T]):
    payload: T
    position: RecordPosition
    key: str | None = None
