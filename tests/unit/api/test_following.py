"""An API replica follows the alias a cutover Job moves: one switch, to the new index and its own model."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

from colstream.api.following import AliasFollower
from colstream.api.lazy import Lazy
from colstream.infra.settings import ColstreamSettings, ModelSettings
from colstream.infra.vectorstore import IndexModel


class FakeClient:
    def __init__(self, points_at: str | None) -> None:
        self.points_at = points_at

    def get_aliases(self) -> Any:
        aliases = [] if self.points_at is None else [
            types.SimpleNamespace(alias_name="colpali_embeddings", collection_name=self.points_at)]
        return types.SimpleNamespace(aliases=aliases)


class FakeIndex:
    def __init__(self, name: str, model: IndexModel) -> None:
        self.index_name = name
        self.model = model

    def index_model(self) -> IndexModel:
        return self.model


class FakeContext:
    def __init__(self, store: FakeIndex | None) -> None:
        self.store: Lazy[Any] = Lazy(lambda: store, given=store)
        self.switches: list[tuple[Any, ModelSettings]] = []

    def switch_serving(self, store: Any, model_settings: ModelSettings) -> None:
        self.switches.append((store, model_settings))
        self.store = Lazy(lambda: store, given=store)


def test_the_api_switches_once_when_the_alias_moves_to_the_new_models_index(tmp_path: Path) -> None:
    settings = ColstreamSettings().updated(state_dir=tmp_path, qdrant={"url": "http://127.0.0.1:1"})
    old = FakeIndex("colpali_embeddings--old", IndexModel(family="colqwen2", model_id="vidore/colqwen2-v1.0",
                                                         revision="main", dim=128))
    new_model = IndexModel(family="colpali", model_id="vidore/colpali-v1.3", revision="main", dim=128)
    ctx = FakeContext(old)
    opened: list[str] = []

    def open_index(name: str) -> FakeIndex:
        opened.append(name)
        return FakeIndex(name, new_model)

    follower = AliasFollower(ctx, settings, client_factory=lambda: None, open_index=open_index)  # type: ignore[arg-type]
    assert follower.follow_once(FakeClient("colpali_embeddings--old")) is False
    assert follower.follow_once(FakeClient(None)) is False  # no alias yet: keep serving
    assert follower.follow_once(FakeClient("colpali_embeddings--new")) is True
    ((store, model_settings),) = ctx.switches
    # the new index, searched with the model that index records
    assert store.index_name == "colpali_embeddings--new" and opened == ["colpali_embeddings--new"]
    assert (model_settings.family, model_settings.name_or_path) == ("colpali", "vidore/colpali-v1.3")
    assert follower.follow_once(FakeClient("colpali_embeddings--new")) is False and len(ctx.switches) == 1


def test_an_api_that_has_not_opened_its_index_yet_has_nothing_to_switch(tmp_path: Path) -> None:
    settings = ColstreamSettings().updated(state_dir=tmp_path, qdrant={"url": "http://127.0.0.1:1"})
    ctx = FakeContext(None)
    ctx.store = Lazy(lambda: FakeIndex("x", IndexModel(family="colpali", model_id="m", revision="r", dim=128)))
    follower = AliasFollower(ctx, settings, client_factory=lambda: None,  # type: ignore[arg-type]
                             open_index=lambda name: (_ for _ in ()).throw(AssertionError("opened")))
    assert follower.follow_once(FakeClient("colpali_embeddings--new")) is False and ctx.switches == []
