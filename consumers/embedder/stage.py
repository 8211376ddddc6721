"""Embedder: page tasks in, float16 page multivectors out (GPU stage).

Each consumed micro-batch goes to the pipelined engine as one group, so the
forward pass sees up to ``batch_size`` pages at once. Several batches may be in
flight: while the device runs one, CPU workers decode and preprocess the next.
Outputs are emitted in input order by the runner, after the engine is done,
and offsets are committed only once the broker acknowledged the vectors.
Control messages (deletes, failures) pass straight through in that order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from colstream.embedding.engine import EmbedItem, EmbedResult, PipelinedEmbedder
from colstream.infra.blobstore import BlobError, BlobStore, open_blob_store
from colstream.infra.kafka import OutRecord
from colstream.infra.settings import ColstreamSettings
from colstream.infra.stage_failures import StageFailures
from colstream.infra.stage_runner import Backpressure, Emit, RawRecord, StageRunner
from colstream.schemas import (
    DocumentDeleted,
    DocumentFailed,
    InvalidRecord,
    PageFailed,
    PageTask,
    PageVectors,
    decode_page_message,
    encode,
)

log = logging.getLogger(__name__)

STAGE = "embedder"


class EmbedderHandler:
    name = STAGE

    def __init__(
        self, settings: ColstreamSettings, engine: PipelinedEmbedder, model_name: str, blob_store: BlobStore
    ) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.engine = engine
        self.model_name = model_name
        self.blob_store = blob_store
        self.failures = StageFailures(STAGE, self.topics.dlq)

    def submit(self, records: Sequence[RawRecord], emit: Emit) -> Future[list[OutRecord]]:
        # slots keep input order: an OutRecord list per input record, or a page task
        # whose vectors are still being computed.
        slots: list[list[OutRecord] | tuple[RawRecord, PageTask]] = []
        items: list[EmbedItem] = []
        for record in records:
            try:
                message = decode_page_message(record.value)
            except InvalidRecord as exc:
                slots.append([self.failures.reject(record, exc.error_type, str(exc))])
                continue
            if isinstance(message, PageFailed | DocumentDeleted | DocumentFailed):
                slots.append([OutRecord(self.topics.vectors, message.document.document_id, encode(message))])
                continue
            try:
                image = message.image_bytes() if message.image_ref is None else self.blob_store.get_bytes(
                    message.image_ref, self.topics.pages_max_message_bytes * 64
                )
            except (BlobError, ValueError) as exc:
                error_type = exc.error_type if isinstance(exc, BlobError) else "InvalidImageEncoding"
                slots.append(self._page_failed(record, message, error_type, str(exc)))
                continue
            items.append(EmbedItem(key=len(slots), image_bytes=image))
            slots.append((record, message))

        result: Future[list[OutRecord]] = Future()
        if not items:
            result.set_result([out for slot in slots if isinstance(slot, list) for out in slot])
            return result

        def finish(done: Future[list[EmbedResult]]) -> None:
            try:
                embedded = done.result()
            except Exception as exc:
                # The model itself failed (not one page): retry the batch later rather
                # than dead-letter good pages.
                result.set_exception(Backpressure(f"embedding failed: {exc!r}"))
                return
            try:
                by_slot: dict[Any, EmbedResult] = {r.key: r for r in embedded}
                outputs: list[OutRecord] = []
                for index, slot in enumerate(slots):
                    if isinstance(slot, list):
                        outputs.extend(slot)
                    else:
                        outputs.extend(self._vectors_or_failure(*slot, by_slot[index]))
                result.set_result(outputs)
            except BaseException as exc:  # surfaced by the runner, which stops the stage
                result.set_exception(exc)

        self.engine.submit(items).add_done_callback(finish)
        return result

    def _vectors_or_failure(self, record: RawRecord, task: PageTask, embedded: EmbedResult) -> list[OutRecord]:
        if embedded.vectors is None:
            return self._page_failed(record, task, embedded.error_type or "EmbedError", embedded.error or "")
        try:
            vectors = PageVectors.from_array(
                document=task.document,
                page_number=task.page_number,
                total_pages=task.total_pages,
                model=self.model_name,
                array=embedded.vectors,
                image_grid=(grid.start, grid.rows, grid.cols) if (grid := embedded.grid) is not None else None,
            )
        except ValueError as exc:  # the embedder's output check: NaN/inf or empty never reach Qdrant
            return self._page_failed(record, task, "InvalidEmbedding", str(exc))
        return [OutRecord(self.topics.vectors, task.document.document_id, encode(vectors))]

    def _page_failed(self, record: RawRecord, task: PageTask, error_type: str, message: str) -> list[OutRecord]:
        letter, failed = self.failures.page(record, task.document, page_number=task.page_number,
                                            total_pages=task.total_pages, error_type=error_type, message=message)
        return [letter, self.failures.downstream(self.topics.vectors, failed)]

    def close(self) -> None:
        self.engine.close()


def build_embedder(settings: ColstreamSettings, **runner_options: Any) -> StageRunner:
    """``runner_options`` go to :class:`StageRunner` (injected clients in tests)."""
    from colstream.embedding.model import load_model

    model = load_model(settings.model)
    engine = PipelinedEmbedder(
        model,
        max_batch_size=settings.model.batch_size,
        preprocess_workers=settings.model.preprocess_workers,
        max_image_pixels=settings.limits.max_image_pixels,
    )
    handler = EmbedderHandler(settings, engine, model.model_name, open_blob_store(settings))
    return StageRunner(
        settings,
        handler,
        topics=[settings.topics.pages],
        group_id=f"{settings.consumer_group_prefix}embedder",
        batch_size=settings.model.batch_size,
        batch_timeout_ms=settings.model.batch_timeout_ms,
        # While the device runs one batch, CPU workers preprocess the next ones.
        max_in_flight=settings.embedder.max_in_flight,
        **runner_options,
    )
