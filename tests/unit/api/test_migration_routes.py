"""`/admin/migration`: admin scope only, the core's refusals as status codes, and the serving
switch a cutover makes: searches move to the new store and model together."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from colstream.api.app import create_app
from colstream.infra.settings import ModelSettings
from colstream.migration.core import MigrationError
from tests.unit.api.test_app import FakeModel, FakePublisher, FakeStore
from tests.unit.api.test_app_keys import auth, make_settings


class FakeMigrations:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.switch: Any = None
        self.refuse: MigrationError | None = None

    def attach_api(self, switch: Any) -> None:
        self.switch = switch

    def _answer(self, name: str, *args: Any) -> dict[str, Any]:
        self.calls.append((name, args))
        if self.refuse is not None:
            raise self.refuse
        return {"phase": name}

    def start(self, family: str, name_or_path: str | None, revision: str | None, tiny_model: bool) -> dict[str, Any]:
        return self._answer("start", family, name_or_path, revision, tiny_model)

    def status(self, document_id: str | None = None) -> dict[str, Any]:
        return self._answer("status", document_id)

    def cutover(self, force: bool = False) -> dict[str, Any]:
        return self._answer("cutover", force)

    def finish(self) -> dict[str, Any]:
        return self._answer("finish")

    def abort(self) -> dict[str, Any]:
        return self._answer("abort")


@dataclass
class Loaded:
    settings: list[ModelSettings]


def test_migration_routes_need_the_admin_scope_and_pass_the_commands_through(tmp_path: Path) -> None:
    migrations = FakeMigrations()
    app = create_app(make_settings(tmp_path), store=FakeStore(), publisher=FakePublisher(),
                     model_loader=lambda _: FakeModel(), migrations=migrations)
    client = TestClient(app)
    assert client.get("/admin/migration").status_code == 401
    assert client.get("/admin/migration", headers=auth("reader")).status_code == 403
    assert client.post("/admin/migration/cutover", headers=auth("acme")).status_code == 403
    admin = auth("admin")
    assert client.post("/admin/migration", headers=admin,
                       json={"family": "colpali", "tiny_model": True}).json() == {"phase": "start"}
    assert client.get("/admin/migration", params={"document_id": "d"}, headers=admin).status_code == 200
    assert client.post("/admin/migration/cutover", params={"force": "true"}, headers=admin).status_code == 200
    client.post("/admin/migration/finish", headers=admin)
    client.post("/admin/migration/abort", headers=admin)
    assert migrations.calls == [("start", ("colpali", None, None, True)), ("status", ("d",)),
                                ("cutover", (True,)), ("finish", ()), ("abort", ())]
    migrations.refuse = MigrationError("not_ready", "backfill not complete: 1/2 documents")
    refused = client.post("/admin/migration/cutover", headers=admin)
    assert refused.status_code == 409 and "1/2 documents" in refused.json()["detail"]
    migrations.refuse = MigrationError("not_found", "no migration has been started")
    assert client.get("/admin/migration", headers=admin).status_code == 404


def test_the_routes_are_not_served_without_a_migration_runtime(tmp_path: Path) -> None:
    client = TestClient(create_app(make_settings(tmp_path), store=FakeStore(), publisher=FakePublisher()))
    assert client.get("/admin/migration", headers=auth("admin")).status_code == 404


def test_a_cutover_switches_search_to_the_new_store_and_its_model_at_once(tmp_path: Path) -> None:
    old_store, new_store = FakeStore(), FakeStore()
    old_store.search_results = [(1.0, {"document_id": "a", "page_number": 1, "model": "old-model"})]
    new_store.search_results = [(2.0, {"document_id": "a", "page_number": 1, "model": "new-model"})]
    loaded: list[ModelSettings] = []

    def loader(settings: ModelSettings) -> FakeModel:
        loaded.append(settings)
        return FakeModel(model_name="new-model" if settings.family == "colpali" else "old-model",
                         is_random_weights=False)

    migrations = FakeMigrations()
    client = TestClient(create_app(make_settings(tmp_path), store=old_store, publisher=FakePublisher(),
                                   model_loader=loader, migrations=migrations))
    first = client.post("/search", json={"query": "x"}, headers=auth("reader")).json()
    assert first["model"] == "old-model" and [r["model"] for r in first["results"]] == ["old-model"]
    new_settings = ModelSettings(family="colpali", name_or_path="new")
    migrations.switch(new_store, new_settings)
    assert loaded[-1] == new_settings  # loaded before the swap: the first search after it does not wait
    second = client.post("/search", json={"query": "x"}, headers=auth("reader")).json()
    assert second["model"] == "new-model" and [r["model"] for r in second["results"]] == ["new-model"]
    assert len(new_store.search_calls) == 1 and len(old_store.search_calls) == 1


def test_a_failing_command_answers_with_its_kind(tmp_path: Path) -> None:
    from colstream.embedding.profile import ModelIdentityError

    migrations = FakeMigrations()
    client = TestClient(create_app(make_settings(tmp_path), store=FakeStore(), publisher=FakePublisher(),
                                   migrations=migrations), raise_server_exceptions=False)
    migrations.refuse = ModelIdentityError("checkpoint '/srv/models/x' has no multivector projection")  # type: ignore[assignment]
    bad = client.post("/admin/migration", json={"family": "colpali"}, headers=auth("admin"))
    assert bad.status_code == 400 and "ModelIdentityError" in bad.json()["detail"]
    assert "/srv/models" not in bad.json()["detail"]
    migrations.refuse = RuntimeError("disk full")  # type: ignore[assignment]
    broken = client.post("/admin/migration/finish", headers=auth("admin"))
    assert broken.status_code == 500 and "disk full" in broken.json()["detail"]
