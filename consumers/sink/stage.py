"""Sink: page vectors in, Qdrant points and per-document records out.

The runner hands over a micro-batch; :class:`SinkCore` applies latest-wins and
writes durably; only then are completion events produced to
``documents.indexed`` and the offsets committed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future

import numpy as np

from colstream.consumers.sink.core import SinkCore, SinkOutcome, VectorsMessage
from colstream.infra.kafka import OutRecord
from colstream.infra.settings import ColstreamSettings
from colstream.infra.stage_runner import Emit, RawRecord, StageRunner, dead_letter
from colstream.infra.vectorstore import VectorStore, open_vector_store
from colstream.schemas import InvalidRecord, PageFailed, PageVectors, decode_vectors, encode

log = logging.getLogger(__name__)

STAGE = "sink"


class InvalidVectors(InvalidRecord):
    def __init__(self, message: PageVectors, reason: str) -> None:
        super().__init__("InvalidVectors", reason)
        self.message = message

    def as_page_failed(self) -> PageFailed:
        m = self.message
        return PageFailed(document=m.document, page_number=m.page_number, total_pages=m.total_pages,
                          stage=STAGE, error_type=self.error_type, message=str(self))


def check_vectors(message: PageVectors, dim: int) -> None:
    """Qdrant must never see a NaN or a wrong-sized vector; such a page is dead-lettered."""
    try:
        array = message.to_array()
    except ValueError as exc:
        raise InvalidVectors(message, f"vectors do not decode to {message.num_tokens}x{message.dim}: {exc}") from exc
    if message.dim != dim:
        raise InvalidVectors(message, f"vectors have dimension {message.dim}, the collection holds {dim}")
    if not np.isfinite(array).all():
        raise InvalidVectors(message, "vectors contain NaN or inf")
    if message.page_number > message.total_pages:
        raise InvalidVectors(message, f"page {message.page_number} of {message.total_pages}")


class SinkHandler:
    name = STAGE

    def __init__(self, settings: ColstreamSettings, store: VectorStore, *, write_attempts: int = 8) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.store = store
        self.core = SinkCore(store)
        self.dim = 128
        self.write_attempts = write_attempts

    def submit(self, records: Sequence[RawRecord], emit: Emit) -> Future[list[OutRecord]]:
        result: Future[list[OutRecord]] = Future()
        try:
            result.set_result(self.write(records))
        except BaseException as exc:
            result.set_exception(exc)
        return result

    def write(self, records: Sequence[RawRecord]) -> list[OutRecord]:
        outputs: list[OutRecord] = []
        messages: list[VectorsMessage] = []
        for record in records:
            try:
                message = decode_vectors(record.value)
                if isinstance(message, PageVectors):
                    check_vectors(message, self.dim)
            except InvalidVectors as exc:
                ref = exc.message.document
                outputs.append(dead_letter(STAGE, self.topics.dlq, record, exc.error_type, str(exc),
                                           document_id=ref.document_id, version=ref.version,
                                           page_number=exc.message.page_number))
                # The page still settles (as failed), so its document can complete.
                messages.append(exc.as_page_failed())
                continue
            except InvalidRecord as exc:
                outputs.append(dead_letter(STAGE, self.topics.dlq, record, exc.error_type, str(exc)))
                continue
            messages.append(message)
        if messages:
            outcome = self._apply_with_retry(messages)
            outputs.extend(
                OutRecord(self.topics.indexed, done.document_id, encode(done)) for done in outcome.completed
            )
        return outputs

    def _apply_with_retry(self, messages: list[VectorsMessage]) -> SinkOutcome:
        # A store outage is not the documents' fault: retry with backoff, and if it
        # persists let the stage stop uncommitted so a restart replays the batch.
        delay = 0.5
        for attempt in range(1, self.write_attempts + 1):
            try:
                return self.core.apply(messages)
            except Exception as exc:
                if attempt == self.write_attempts:
                    raise
                log.warning("sink: write failed (%s), attempt %d/%d", exc, attempt, self.write_attempts)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.store.close()


def build_sink(settings: ColstreamSettings, store: VectorStore | None = None) -> StageRunner:
    store = store or open_vector_store(settings.qdrant)
    store.ensure_collections()
    return StageRunner(
        settings,
        SinkHandler(settings, store),
        topics=[settings.topics.vectors],
        group_id=f"{settings.consumer_group_prefix}sink",
        batch_size=64,
        batch_timeout_ms=100,
        max_in_flight=1,
    )
