"""In-memory stand-ins for migration tests: the state store and the index side of an adapter."""

from __future__ import annotations

from dataclasses import dataclass, field

from colstream.migration.core import MigrationState


@dataclass
class MemoryStateStore:
    """The migration state in memory, with every save kept (in order)."""

    saved: list[MigrationState] = field(default_factory=list)

    def load(self) -> MigrationState | None:
        return self.saved[-1] if self.saved else None

    def save(self, state: MigrationState) -> None:
        self.saved.append(state)


@dataclass
class MemoryIndex:
    """One index of a store, in memory: its records and page counts per document."""

    name: str
    records_name: str
    model: object | None = None
    records: dict[str, object] = field(default_factory=dict)
    pages: dict[str, int] = field(default_factory=dict)
    closed: bool = False
    ensured_with: list[object] = field(default_factory=list)

    @property
    def index_name(self) -> str:
        return self.name

    def index_model(self) -> object | None:
        return self.model

    def ensure_collections(self, dim: int | None = None, model: object | None = None) -> None:
        self.ensured_with.append(model)
        if model is not None and self.model is None:
            self.model = model

    def list_records(self) -> list[object]:
        return list(self.records.values())

    def put(self, record: object, pages: int = 0) -> None:
        self.records[record.document_id] = record  # type: ignore[attr-defined]
        self.pages[record.document_id] = pages  # type: ignore[attr-defined]

    def count_pages(self, document_id: str | None = None, filter: object = None) -> int:
        if document_id is not None:
            return self.pages.get(document_id, 0)
        return sum(self.pages.values())

    def close(self) -> None:
        self.closed = True


@dataclass
class MemoryIndexAdmin:
    """The index side of a migration adapter: opened, aliased and dropped indexes, in memory."""

    indexes: dict[str, MemoryIndex] = field(default_factory=dict)
    alias: str | None = None
    dropped: list[str] = field(default_factory=list)

    def open(self, index: object) -> MemoryIndex:
        name, records = index.name, index.records  # type: ignore[attr-defined]
        return self.indexes.setdefault(name, MemoryIndex(name, records))

    def point_alias(self, index: object) -> None:
        self.alias = index.name  # type: ignore[attr-defined]

    def exists(self, index: object) -> bool:
        return index.name in self.indexes  # type: ignore[attr-defined]

    def drop(self, index: object) -> None:
        name = index.name  # type: ignore[attr-defined]
        if self.alias == name:
            raise RuntimeError(f"{name} is served by the alias")
        self.indexes.pop(name, None)
        self.dropped.append(name)


class FakeRunner:
    """A stage runner that runs until asked to stop, with the attributes the app reads."""

    def __init__(self, name: str, settings: object) -> None:
        import threading
        import types

        from colstream.infra.health import StageHealth
        from colstream.infra.stage_runner import StageStats

        self.handler = types.SimpleNamespace(name=name)
        self.settings = settings
        self.health = StageHealth(name, settings.health)  # type: ignore[attr-defined]
        self.stats = StageStats()
        self.shutdown_grace_s = 1.0
        self.stopped = threading.Event()

    def run(self) -> None:
        self.stopped.wait()

    def request_stop(self) -> None:
        self.stopped.set()
