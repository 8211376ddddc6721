"""Sink: page vectors in, Qdrant points and per-document records out.

The runner hands over a micro-batch; :class:`SinkCore` applies latest-wins and
writes durably; only then are completion events produced to
``documents.indexed`` and the offsets committed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from colstream.consumers.sink.core import SinkCore, SinkOutcome
from colstream.consumers.sink.limits import VectorsTooLarge, WriteLimits, fit_page
from colstream.infra.blob_gc import BlobJanitor, open_owned_store
from colstream.infra.kafka import OutRecord
from colstream.infra.metrics import StageMetrics
from colstream.infra.settings import ColstreamSettings
from colstream.infra.stage_failures import StageFailures
from colstream.infra.stage_runner import Backpressure, Emit, RawRecord, StageRunner
from colstream.infra.vectorstore import (
    InvalidVectorsError,
    PatchGrid,
    VectorStore,
    check_page_vectors,
    open_vector_store,
)
from colstream.schemas import InvalidRecord, PageVectors, PipelineError, VectorsMessage, decode_vectors, encode

log = logging.getLogger(__name__)

STAGE = "sink"


def check_vectors(message: PageVectors, dim: int, model: str | None = None) -> None:
    """The sink's input check, the one place vectors from the topic are validated:
    Qdrant must never see a NaN, a wrong-sized vector or another model's vectors; such a
    page is dead-lettered. ``model``: the label of the index's model (None: not checked).
    What valid vectors are is :func:`~colstream.infra.vectorstore.check_page_vectors`."""
    where = f"document {message.document.document_id!r} page {message.page_number}"
    if model is not None and message.model != model:
        raise InvalidVectorsError(f"vectors come from model {message.model!r}; the index belongs to {model!r}")
    try:
        array = message.to_array()
    except ValueError as exc:
        raise InvalidVectorsError(f"vectors do not decode to {message.num_tokens}x{message.dim}: {exc}") from exc
    check_page_vectors(array, where, dim)
    if message.page_number > message.total_pages:
        raise InvalidVectorsError(f"page {message.page_number} of {message.total_pages}")


def write_limits(settings: ColstreamSettings) -> WriteLimits:
    """Qdrant's limits for this deployment: a server is reached over REST (request body
    limit ``qdrant.max_request_mb``). The embedded Edge store takes no requests, but the
    per-multivector limit is applied there too, so an index can move to a server as it is."""
    qdrant = settings.qdrant
    layout = {
        "pooler": qdrant.oversize_pooler,
        "layout_pooling_factor": qdrant.token_pooling_factor if qdrant.token_pooling_factor > 1 else 0,
        "prefetch": qdrant.mean_pooled_prefetch,
    }
    if qdrant.url:
        return WriteLimits.for_transport("rest", qdrant.max_request_mb * 1024 * 1024, **layout)
    return WriteLimits.for_transport("embedded", None, **layout)


def fit_to_limits(message: PageVectors, limits: WriteLimits) -> PageVectors:
    """The page as it can be written (pooled down when over a limit), or VectorsTooLarge."""
    where = f"document {message.document.document_id!r} page {message.page_number}"
    grid = _message_grid(message)
    fitted = fit_page(message.to_array(), grid, limits, payload=_payload_estimate(message), where=where)
    if fitted.pooled_from is None:
        return message
    log.warning("%s: %d vectors pooled by %d to %d to fit Qdrant's limits", where, fitted.pooled_from,
                fitted.factor, fitted.vectors.shape[0])
    return PageVectors.from_array(document=message.document, page_number=message.page_number,
                                  total_pages=message.total_pages, model=message.model, array=fitted.vectors)


def _message_grid(message: PageVectors) -> PatchGrid | None:
    if message.image_token_start is None or message.grid_rows is None or message.grid_cols is None:
        return None
    return PatchGrid(start=message.image_token_start, rows=message.grid_rows, cols=message.grid_cols)


def _payload_estimate(message: PageVectors) -> dict[str, Any]:
    ref = message.document
    return {"document_id": ref.document_id, "filename": ref.filename, "blob_uri": ref.blob_uri,
            "model": message.model, "metadata": ref.metadata}


def index_dimension(store: VectorStore) -> int:
    """The vector size of the pages collection the sink writes to. The sink checks
    incoming vectors against what the index holds (not against a model it never
    loads): that is what a write must match, and a page of another size is refused
    on its own instead of failing the whole batch in the store."""
    dim = store.stats().get("vector_dimension")
    if not isinstance(dim, int):
        raise RuntimeError("the pages collection does not exist yet: call ensure_collections() first")
    return dim


class SinkHandler:
    name = STAGE

    def __init__(self, settings: ColstreamSettings, store: VectorStore, *, dim: int | None = None) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.store = store
        self.limits = write_limits(settings)
        self.core = SinkCore(store, self.limits)
        # Owned blobs of deleted and superseded versions go once their successor is settled.
        self.janitor = BlobJanitor(open_owned_store(settings), settings.gc.max_pending_releases)
        self.dim = index_dimension(store) if dim is None else dim
        self.model_label: str | None = None
        self.failures = StageFailures(STAGE, self.topics.dlq)
        self.metrics = StageMetrics(STAGE)
        # Writes run here, off the poll thread; one at a time keeps latest-wins in order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sink")

    def submit(self, records: Sequence[RawRecord], emit: Emit) -> Future[list[OutRecord]]:
        return self._executor.submit(self.write, list(records))

    def write(self, records: Sequence[RawRecord]) -> list[OutRecord]:
        """Validate, apply latest-wins durably, and return the dead letters and completion
        events. A store outage raises :class:`Backpressure`: the runner retries the batch."""
        outputs: list[OutRecord] = []
        messages: list[VectorsMessage] = []
        for record in records:
            try:
                message = decode_vectors(record.value)
            except InvalidRecord as exc:
                outputs.append(self.failures.reject(record, exc.error_type, str(exc)))
                continue
            if isinstance(message, PageVectors):
                try:
                    check_vectors(message, self.dim, self.model_label)
                    message = fit_to_limits(message, self.limits)
                except (InvalidVectorsError, VectorsTooLarge) as exc:
                    letter, failed = self.failures.page(
                        record, message.document, page_number=message.page_number,
                        total_pages=message.total_pages, error_type=exc.error_type, message=str(exc))
                    outputs.append(letter)
                    # The page still settles (as failed), so its document can complete.
                    messages.append(failed)
                    continue
            messages.append(message)
        if messages:
            outcome = self._apply(messages)
            self._release(outcome)
            outputs.extend(
                OutRecord(self.topics.indexed, done.document_id, encode(done)) for done in outcome.completed
            )
        return outputs

    def _apply(self, messages: list[VectorsMessage]) -> SinkOutcome:
        started = time.perf_counter()
        try:
            outcome = self.core.apply(messages)
            self.metrics.sink_write(time.perf_counter() - started)
            self.metrics.pages_indexed(outcome.written_pages)
            return outcome
        except PipelineError:
            raise  # refused for what it is (the index belongs to another model): not transient
        except Exception as exc:
            # A store outage is not the documents' fault: the runner pauses, rewinds
            # and retries the batch after a delay; nothing is committed meanwhile.
            raise Backpressure(f"store write failed: {exc!r}") from exc

    def _release(self, outcome: SinkOutcome) -> None:
        # After _apply: the records that make these blobs unneeded are durable.
        for document_id, uris in outcome.superseded.items():
            self.janitor.superseded(document_id, uris)
        for record in outcome.settled:
            self.janitor.settled(record)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.store.close()


def build_sink(settings: ColstreamSettings, store: VectorStore | None = None, **runner_options: Any) -> StageRunner:
    """``runner_options`` go to :class:`StageRunner` (injected clients in tests)."""
    from colstream.embedding.profile import index_model_for

    index_model = index_model_for(settings.model)
    store = store or open_vector_store(settings.qdrant)
    # Refuses to start (IndexModelMismatch) before anything is written when the index
    # the alias points at belongs to another model.
    store.ensure_collections(model=index_model)
    handler = SinkHandler(settings, store)
    handler.model_label = index_model.label
    tunables = settings.sink
    return StageRunner(
        settings,
        handler,
        topics=[settings.topics.vectors],
        group_id=f"{settings.consumer_group_prefix}sink",
        batch_size=tunables.batch_size,
        batch_timeout_ms=tunables.batch_timeout_ms,
        max_in_flight=tunables.max_in_flight,
        **runner_options,
    )
