"""In-memory stand-ins for the pipeline's edges, for fast tests of the real code:

* :class:`InMemoryBroker` with :class:`FakeConsumer` / :class:`FakeProducer`: pass
  ``consumer_factory=broker.consumer, producer_factory=broker.producer`` to
  :class:`~colstream.infra.stage_runner.StageRunner` (or to ``build_splitter`` and friends);
* :class:`ListEmit`: an ``emit`` that keeps what a handler emits;
* :class:`DummyPageModel`: a model with the embedding engine's interface, no checkpoint;
* :class:`MemoryVectorStore`: the vector store's interface on dicts, which a test can take down;
* :class:`RunningStage` and :func:`wait_until`: a real runner on a thread of the test.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from colstream.infra.kafka import OutRecord
from colstream.testing.broker import FakeConsumer, FakeProducer, InMemoryBroker, StoredRecord
from colstream.testing.running import RunningStage, wait_until
from colstream.testing.stores import MemoryVectorStore

if TYPE_CHECKING:
    from colstream.testing.model import DummyPageModel


class ListEmit(list[OutRecord]):
    """An ``emit`` callback that appends to itself."""

    def __call__(self, record: OutRecord) -> None:
        self.append(record)

    def to(self, topic: str) -> list[OutRecord]:
        return [r for r in self if r.topic == topic]


def __getattr__(name: str) -> object:
    # The model needs torch: imported only when asked for.
    if name == "DummyPageModel":
        from colstream.testing.model import DummyPageModel

        return DummyPageModel
    raise AttributeError(name)


__all__ = [
    "DummyPageModel",
    "FakeConsumer",
    "FakeProducer",
    "InMemoryBroker",
    "ListEmit",
    "MemoryVectorStore",
    "RunningStage",
    "StoredRecord",
    "wait_until",
]
