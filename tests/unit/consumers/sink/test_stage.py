"""The sink adapter on the in-memory broker and store: what a batch of vectors-topic
messages writes and emits, dead letters for bad input, tombstones, latest-wins, the
commit after the write, and backpressure while the store is down."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from colstream.consumers.sink.stage import SinkHandler, check_vectors
from colstream.infra.kafka import RecordPosition
from colstream.infra.settings import ColstreamSettings
from colstream.infra.stage_runner import Backpressure, RawRecord, StageRunner
from colstream.infra.vectorstore import InvalidVectorsError
from colstream.schemas import DocumentDeleted, DocumentRef, PageFailed, PageVectors, decode_vectors, encode
from colstream.testing import InMemoryBroker, MemoryVectorStore, RunningStage, wait_until

DIM = 16
GROUP = "sink-test"


@pytest.fixture
def settings(tmp_path: Path) -> ColstreamSettings:
    return ColstreamSettings().updated(kafka={"bootstrap_servers": "in-memory"}, state_dir=tmp_path,
                                       blob={"local_root": tmp_path / "blobs"}, shutdown={"grace_s": 2.0})


@pytest.fixture
def store() -> MemoryVectorStore:
    return MemoryVectorStore(dim=DIM)


@pytest.fixture
def handler(settings: ColstreamSettings, store: MemoryVectorStore) -> Iterator[SinkHandler]:
    sink = SinkHandler(settings, store)
    yield sink
    sink.close()


def ref(doc: str, version: int) -> DocumentRef:
    return DocumentRef(document_id=doc, version=version, filename=f"{doc}.pdf")


def page(doc: str, version: int, number: int, total: int, *, dim: int = DIM, model: str = "m") -> PageVectors:
    array = np.random.default_rng(version * 100 + number).normal(size=(4, dim)).astype(np.float32)
    return PageVectors.from_array(document=ref(doc, version), page_number=number, total_pages=total,
                                  model=model, array=array)


def poisoned(doc: str, version: int, number: int, total: int) -> PageVectors:
    """A page whose vectors hold a NaN: built past ``from_array``, as a foreign producer might."""
    good = page(doc, version, number, total)
    array = good.to_array().copy()
    array[1, 3] = np.nan
    return good.model_copy(update={"vectors_b64": base64.b64encode(array.astype("<f2").tobytes()).decode()})


def raw(value: bytes | None, offset: int, key: str | None = "d") -> RawRecord:
    return RawRecord(key=key, value=value, position=RecordPosition("documents.vectors", 0, offset))


def records(*messages: Any) -> list[RawRecord]:
    return [raw(m if isinstance(m, bytes) else encode(m), offset) for offset, m in enumerate(messages)]


def decoded(outputs: list[Any], topic: str) -> list[dict[str, Any]]:
    return [json.loads(r.value) for r in outputs if r.topic == topic]


def test_good_pages_are_written_and_their_document_announced_once(
    handler: SinkHandler, store: MemoryVectorStore, settings: ColstreamSettings
) -> None:
    outputs = handler.write(records(page("d", 3, 1, 2), page("d", 3, 2, 2)))
    assert store.pages_of("d") == {1: 3, 2: 3}
    np.testing.assert_array_equal(store.points[("d", 2)].vectors, page("d", 3, 2, 2).to_array())
    [done] = decoded(outputs, settings.topics.indexed)
    assert (done["document_id"], done["version"], done["state"], done["indexed_pages"]) == ("d", 3, "complete", 2)
    assert decoded(outputs, settings.topics.dlq) == []
    # A replay of the same batch rewrites the same points and announces nothing again.
    assert handler.write(records(page("d", 3, 1, 2), page("d", 3, 2, 2))) == []
    assert len(store.points) == 2


@pytest.mark.parametrize(
    ("value", "error_type"),
    [(b"not json", "InvalidJSON"), (b'{"type": "mystery"}', "InvalidVectorsMessage"),
     (None, "UnexpectedTombstone")],
)
def test_an_unreadable_record_is_dead_lettered_with_its_reason_and_writes_nothing(
    handler: SinkHandler, store: MemoryVectorStore, settings: ColstreamSettings, value: bytes | None, error_type: str
) -> None:
    outputs = handler.write([raw(value, 7)])
    [letter] = decoded(outputs, settings.topics.dlq)
    assert (letter["stage"], letter["error_type"], letter["source_offset"]) == ("sink", error_type, 7)
    assert letter["message"]
    assert letter.get("original_value") == (value.decode() if value is not None else None)
    assert store.points == {} and store.records == {} and store.writes == 0


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (lambda: poisoned("d", 1, 2, 2), "NaN"),
        (lambda: page("d", 1, 2, 2, dim=DIM * 2), "dimension"),
    ],
    ids=["nan", "wrong-dim"],
)
def test_invalid_vectors_are_dead_lettered_and_the_page_settles_as_failed(
    handler: SinkHandler, store: MemoryVectorStore, settings: ColstreamSettings, bad: Any, reason: str
) -> None:
    outputs = handler.write(records(page("d", 1, 1, 2), bad()))
    [letter] = decoded(outputs, settings.topics.dlq)
    assert (letter["error_type"], letter["document_id"], letter["page_number"]) == ("InvalidVectors", "d", 2)
    assert reason in letter["message"]
    # Qdrant never sees the bad page; the good one is written and the document completes as partial.
    assert store.pages_of("d") == {1: 1}
    [done] = decoded(outputs, settings.topics.indexed)
    assert (done["state"], done["failed_pages"]) == ("partial", [2])


def test_the_input_check_names_the_page_whose_vectors_hold_nan() -> None:
    # The sink's one check of what it reads; the store's PagePoint does not repeat it.
    message = decode_vectors(encode(poisoned("d", 1, 2, 2)))
    assert isinstance(message, PageVectors)
    with pytest.raises(InvalidVectorsError, match=r"page 2.*NaN"):
        check_vectors(message, DIM)


def test_a_patch_grid_beyond_the_tokens_is_dead_lettered_and_writes_nothing(
    handler: SinkHandler, store: MemoryVectorStore, settings: ColstreamSettings
) -> None:
    value = json.loads(encode(page("d", 1, 1, 1)))
    value.update(image_token_start=2, grid_rows=3, grid_cols=3)  # reaches token 11 of 4
    outputs = handler.write([raw(json.dumps(value).encode(), 5)])
    [letter] = decoded(outputs, settings.topics.dlq)
    assert (letter["error_type"], letter["source_offset"]) == ("InvalidVectorsMessage", 5)
    assert "grid" in letter["message"]
    assert store.points == {} and store.writes == 0


def test_vectors_of_another_model_are_dead_lettered(
    handler: SinkHandler, store: MemoryVectorStore, settings: ColstreamSettings
) -> None:
    handler.model_label = "the-index-model"
    outputs = handler.write(records(page("d", 1, 1, 1, model="another-model")))
    [letter] = decoded(outputs, settings.topics.dlq)
    assert letter["error_type"] == "InvalidVectors" and "another-model" in letter["message"]
    assert store.points == {}


def test_a_failed_page_from_upstream_settles_its_document(
    handler: SinkHandler, store: MemoryVectorStore, settings: ColstreamSettings
) -> None:
    failed = PageFailed(document=ref("d", 4), page_number=1, total_pages=2, stage="splitter",
                        error_type="RenderTimeout", message="slow")
    outputs = handler.write(records(failed, page("d", 4, 2, 2)))
    assert store.pages_of("d") == {2: 4}
    [done] = decoded(outputs, settings.topics.indexed)
    assert (done["state"], done["failed_pages"]) == ("partial", [1])
    assert decoded(outputs, settings.topics.dlq) == []  # the splitter already dead-lettered it


def test_a_delete_removes_every_page_and_announces_deleted(
    handler: SinkHandler, store: MemoryVectorStore, settings: ColstreamSettings
) -> None:
    handler.write(records(page("d", 1, 1, 2), page("d", 1, 2, 2), page("other", 2, 1, 1)))
    outputs = handler.write(records(DocumentDeleted(document=ref("d", 5))))
    assert store.pages_of("d") == {} and store.pages_of("other") == {1: 2}
    [done] = decoded(outputs, settings.topics.indexed)
    assert (done["document_id"], done["version"], done["state"]) == ("d", 5, "deleted")
    assert store.records["d"].state == "deleted"
    # A page of the deleted version that arrives late is dropped, not resurrected.
    handler.write(records(page("d", 1, 1, 2)))
    assert store.pages_of("d") == {}


def test_latest_version_wins_over_older_pages_in_any_batch(
    handler: SinkHandler, store: MemoryVectorStore, settings: ColstreamSettings
) -> None:
    handler.write(records(*(page("d", 1, n, 3) for n in (1, 2, 3))))
    # A re-upload (version 9) with fewer pages, then a straggler of version 5 in the same batch.
    outputs = handler.write(records(page("d", 9, 1, 1), page("d", 5, 2, 3)))
    assert store.pages_of("d") == {1: 9}
    assert [(d["version"], d["state"]) for d in decoded(outputs, settings.topics.indexed)] == [(9, "complete")]
    assert store.records["d"].version == 9


def test_a_store_outage_is_backpressure_not_a_dead_letter(handler: SinkHandler, store: MemoryVectorStore) -> None:
    store.down = True
    with pytest.raises(Backpressure, match="store write failed"):
        handler.write(records(page("d", 1, 1, 1)))
    store.down = False
    assert handler.write(records(page("d", 1, 1, 1)))  # the retry writes and announces
    assert store.pages_of("d") == {1: 1}


def run_sink(settings: ColstreamSettings, broker: InMemoryBroker, handler: SinkHandler) -> RunningStage:
    runner = StageRunner(settings, handler, topics=[settings.topics.vectors], group_id=GROUP, batch_size=8,
                         batch_timeout_ms=10, consumer_factory=broker.consumer, producer_factory=broker.producer)
    return RunningStage(runner)


def publish(broker: InMemoryBroker, settings: ColstreamSettings, *messages: PageVectors) -> None:
    for m in messages:
        broker.append(settings.topics.vectors, m.document.document_id, encode(m))


def test_offsets_are_committed_only_after_the_write_is_durable(
    handler: SinkHandler, store: MemoryVectorStore, settings: ColstreamSettings
) -> None:
    broker = InMemoryBroker()
    store.hold_writes = threading.Event()
    publish(broker, settings, page("d", 1, 1, 2), page("d", 1, 2, 2))
    with run_sink(settings, broker, handler) as running:
        wait_until(lambda: running.runner.stats.batches == 1, what="batch handed over")
        threading.Event().wait(0.3)
        assert broker.committed_offset(GROUP, settings.topics.vectors) is None
        assert broker.values(settings.topics.indexed) == []
        store.hold_writes.set()
        wait_until(lambda: broker.committed_offset(GROUP, settings.topics.vectors) == 2, what="commit after write")
        assert store.pages_of("d") == {1: 1, 2: 1}
        [done] = [json.loads(v or b"") for v in broker.values(settings.topics.indexed)]
        assert done["state"] == "complete"
        running.stop()
        assert running.error is None


def test_a_store_outage_pauses_and_retries_the_batch_until_the_store_is_back(
    handler: SinkHandler, store: MemoryVectorStore, settings: ColstreamSettings
) -> None:
    broker = InMemoryBroker()
    store.down = True
    publish(broker, settings, page("d", 1, 1, 1))
    with run_sink(settings, broker, handler) as running:
        wait_until(lambda: running.runner.backpressure_events >= 1, what="backpressure")
        assert broker.committed_offset(GROUP, settings.topics.vectors) is None
        assert broker.values(settings.topics.dlq) == []  # an outage is not the record's fault
        store.down = False
        wait_until(lambda: broker.committed_offset(GROUP, settings.topics.vectors) == 1, what="commit after outage")
        assert store.pages_of("d") == {1: 1}
        assert len(broker.values(settings.topics.indexed)) == 1
        running.stop()
        assert running.error is None
