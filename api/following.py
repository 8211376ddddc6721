"""An API replica on a Qdrant server follows the alias.

On a cluster the cutover is a Job (:mod:`colstream.migration.cluster`) that points the
alias at the new model's index; the API replicas are other pods. Each one looks where
the alias points every ``qdrant.alias_follow_s`` and, when it moved, opens the new
index and the model that index records, then swaps both in one assignment
(:meth:`colstream.api.app.ApiContext.switch_serving`): a search embeds and searches
with one model, never one model's query against the other's index.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from colstream.infra.settings import ColstreamSettings, ModelSettings

if TYPE_CHECKING:
    from colstream.api.app import ApiContext

log = logging.getLogger(__name__)


def alias_target(settings: ColstreamSettings, client: Any) -> str | None:
    """The collection the alias points at; None when there is no alias (yet)."""
    for alias in client.get_aliases().aliases:
        if alias.alias_name == settings.qdrant.collection:
            return str(alias.collection_name)
    return None


class AliasFollower:
    """A daemon thread that moves the API's (index, model) pair when the alias moves."""

    def __init__(
        self,
        ctx: ApiContext,
        settings: ColstreamSettings,
        *,
        client_factory: Callable[[], Any] | None = None,
        open_index: Callable[[str], Any] | None = None,
    ) -> None:
        self.ctx = ctx
        self.settings = settings
        self.interval_s = settings.qdrant.alias_follow_s
        self._client_factory = client_factory or self._client
        self._open_index = open_index or self._open
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alias-follower", daemon=True)
        self.switches = 0

    def _client(self) -> Any:
        from colstream.infra.vectorstore_qdrant import server_client

        return server_client(self.settings.qdrant, timeout_s=30)

    def _open(self, index: str) -> Any:
        from colstream.infra.vectorstore_qdrant import QdrantServerVectorStore

        return QdrantServerVectorStore(self.settings.qdrant, index=index)

    def start(self) -> AliasFollower:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.interval_s + 30.0)

    def _run(self) -> None:
        client = None
        while not self._stop.wait(self.interval_s):
            try:
                client = client or self._client_factory()
                self.follow_once(client)
            except Exception as exc:  # Qdrant away for a moment: serve what we have, look again later
                log.warning("following alias %r: %s", self.settings.qdrant.collection, exc)
        if client is not None:
            client.close()

    def follow_once(self, client: Any) -> bool:
        """Switch when the alias points elsewhere than the index served now; True if it did."""
        current = self.ctx.store.peek()
        if current is None:
            return False  # opened on first use, through the alias as it is then
        target = alias_target(self.settings, client)
        if target is None or target == getattr(current, "index_name", target):
            return False
        from colstream.embedding.profile import model_settings_for_index

        store = self._open_index(target)
        model_settings: ModelSettings = model_settings_for_index(self.settings.model, store.index_model())
        log.info("alias %r now points at %s: serving it with %s", self.settings.qdrant.collection, target,
                 model_settings.name_or_path or model_settings.family)
        self.ctx.switch_serving(store, model_settings)
        self.switches += 1
        return True
