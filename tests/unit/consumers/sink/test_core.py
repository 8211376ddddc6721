"""The sink's latest-wins rule, on an in-memory page store (no Kafka, no Qdrant)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from colstream.consumers.sink.core import SinkCore, VectorsMessage
from colstream.schemas import (
    DocumentDeleted,
    DocumentFailed,
    DocumentRef,
    PageFailed,
    PageVectors,
)
from colstream.testing import MemoryVectorStore

# The in-memory page store every sink test uses (also imported by other test modules).
MemoryPages = MemoryVectorStore


def vec(doc: str, version: int, page: int, total: int) -> PageVectors:
    rng = np.random.default_rng(version * 1000 + page)
    return PageVectors.from_array(document=DocumentRef(document_id=doc, version=version, filename=f"{doc}.pdf"),
                                  page_number=page, total_pages=total, model="m", array=rng.normal(size=(5, 128)))


def failed_page(doc: str, version: int, page: int, total: int) -> PageFailed:
    return PageFailed(document=DocumentRef(document_id=doc, version=version), page_number=page,
                      total_pages=total, stage="splitter", error_type="RenderTimeout", message="slow")


def deleted(doc: str, version: int) -> DocumentDeleted:
    return DocumentDeleted(document=DocumentRef(document_id=doc, version=version))


def test_a_document_completes_once_and_announces_it() -> None:
    store = MemoryPages()
    core = SinkCore(store)
    first = core.apply([vec("d", 5, 1, 2)])
    assert first.completed == [] and store.records["d"].state == "indexing"
    second = core.apply([vec("d", 5, 2, 2)])
    assert [c.state for c in second.completed] == ["complete"]
    assert sorted(p for (_, p) in store.points) == [1, 2]
    # A replay of the same version rewrites the same points and does not announce again.
    again = core.apply([vec("d", 5, 1, 2), vec("d", 5, 2, 2)])
    assert again.completed == [] and len(store.points) == 2


def test_reupload_with_fewer_pages_purges_the_old_ones() -> None:
    store = MemoryPages()
    core = SinkCore(store)
    core.apply([vec("d", 1, p, 10) for p in range(1, 11)])
    core.apply([vec("d", 7, p, 3) for p in range(1, 4)])
    assert sorted(p.page_number for p in store.points.values()) == [1, 2, 3]
    assert {p.version for p in store.points.values()} == {7}
    assert store.records["d"].total_pages == 3 and store.records["d"].state == "complete"


def test_vectors_older_than_a_delete_are_dropped_never_written() -> None:
    store = MemoryPages()
    core = SinkCore(store)
    core.apply([vec("d", 1, 1, 2)])
    out = core.apply([deleted("d", 4), vec("d", 1, 2, 2)])  # in-flight page overtaken by the delete
    assert out.dropped_stale == 1
    assert store.points == {}
    assert store.records["d"].state == "deleted" and store.records["d"].version == 4
    assert core.apply([vec("d", 1, 1, 2)]).dropped_stale == 1 and store.points == {}


def test_failed_pages_are_recorded_and_the_document_is_partial() -> None:
    store = MemoryPages()
    out = SinkCore(store).apply([vec("d", 3, 1, 3), failed_page("d", 3, 2, 3), vec("d", 3, 3, 3)])
    rec = store.records["d"]
    assert rec.state == "partial" and rec.failed_pages == [2] and rec.indexed_pages == [1, 3]
    assert out.completed[0].failed_pages == [2]


def test_a_failed_latest_version_removes_the_previous_pages() -> None:
    store = MemoryPages()
    core = SinkCore(store)
    core.apply([vec("d", 1, 1, 1)])
    core.apply([DocumentFailed(document=DocumentRef(document_id="d", version=9), stage="splitter",
                               error_type="BrokenDocument", message="bad xref")])
    assert store.points == {} and store.records["d"].state == "failed"
    assert "BrokenDocument" in (store.records["d"].error or "")


# -- model-based: any interleaving converges to latest-event-wins ------------------------
op = st.one_of(
    st.tuples(st.just("upload"), st.sampled_from("abc"), st.integers(1, 4)),
    st.tuples(st.just("delete"), st.sampled_from("abc"), st.just(0)),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(op, min_size=1, max_size=25), batch=st.integers(1, 7), dup=st.booleans())
def test_random_operations_converge_to_latest_event_wins(
    ops: list[tuple[str, str, int]], batch: int, dup: bool
) -> None:
    # Versions are offsets: strictly increasing in publish order.
    per_doc: dict[str, list[VectorsMessage]] = {}
    model: dict[str, tuple[int, int] | None] = {}
    for version, (kind, doc, pages) in enumerate(ops):
        if kind == "delete":
            per_doc.setdefault(doc, []).append(deleted(doc, version))
            model[doc] = None
        else:
            per_doc.setdefault(doc, []).extend(vec(doc, version, p, pages) for p in range(1, pages + 1))
            model[doc] = (version, pages)
    # Documents interleave freely; each document's own messages keep partition order,
    # and a replay (duplicate delivery) of everything must change nothing.
    stream: list[VectorsMessage] = []
    queues = {d: list(m) for d, m in per_doc.items()}
    i = 0
    while any(queues.values()):
        d = sorted(queues)[i % len(queues)]
        if queues[d]:
            stream.append(queues[d].pop(0))
        i += 1
    if dup:
        stream = stream + stream
    store = MemoryPages()
    core = SinkCore(store)
    for start in range(0, len(stream), batch):
        core.apply(stream[start:start + batch])
    for doc, expected in model.items():
        stored = sorted((p.page_number, p.version) for p in store.points.values() if p.document_id == doc)
        if expected is None:
            assert stored == [] and store.records[doc].state == "deleted"
        else:
            version, count = expected
            assert stored == [(p, version) for p in range(1, count + 1)]
            assert store.records[doc].state == "complete" and store.records[doc].version == version
