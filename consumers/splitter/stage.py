"""Splitter: one upload event in, one page task per page out (CPU stage).

Walk of one upload: the record's offset becomes the document's *version*; the
blob is streamed to a bounded temp file; the content (never the name) decides
PDF, image, or an Office/HTML/text document that LibreOffice converts to PDF first
(:mod:`.convert`: sandboxed, time- and memory-limited); worker processes render each page at the size the configured
model consumes; every page is published the moment it is rendered, so a
1,000-page PDF never sits in memory. A tombstone becomes a DocumentDeleted in
the same partition order as the pages, and reaches the sink that way.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from colstream.consumers.splitter.convert import OfficeConverter, renderable
from colstream.consumers.splitter.render import DocumentError, RenderedPage
from colstream.consumers.splitter.workers import PageFailure, StreamingRenderer
from colstream.embedding.profile import RenderTarget, render_target_for
from colstream.infra.blob_names import claim_blob_dir
from colstream.infra.blobstore import BlobError, BlobStore, open_blob_store
from colstream.infra.kafka import OutRecord
from colstream.infra.settings import ColstreamSettings
from colstream.infra.stage_failures import StageFailures
from colstream.infra.stage_runner import Emit, RawRecord, StageRunner
from colstream.schemas import (
    DocumentDeleted,
    DocumentRef,
    InvalidRecord,
    PageTask,
    decode_upload,
    encode,
)

log = logging.getLogger(__name__)

STAGE = "splitter"
# JSON framing around the base64 image: document ref, numbers, field names.
_ENVELOPE_ALLOWANCE = 16_384


class SplitterHandler:
    name = STAGE

    def __init__(
        self,
        settings: ColstreamSettings,
        blob_store: BlobStore,
        renderer: StreamingRenderer,
        target: RenderTarget,
        converter: OfficeConverter | None = None,
    ) -> None:
        """Without ``converter``, Office/HTML/text documents are refused as ``UnsupportedFormat``."""
        self.settings = settings
        self.topics = settings.topics
        self.blob_store = blob_store
        self.renderer = renderer
        self.target = target
        self.converter = converter
        self.failures = StageFailures(STAGE, self.topics.dlq)
        # One document at a time keeps pages in partition order; the parallelism
        # is in the render worker processes.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitter")

    def submit(self, records: Sequence[RawRecord], emit: Emit) -> Future[list[OutRecord]]:
        return self._executor.submit(self._split_all, list(records), emit)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.renderer.close()
        if self.converter is not None:
            self.converter.close()

    def _split_all(self, records: list[RawRecord], emit: Emit) -> list[OutRecord]:
        for record in records:
            self.split(record, emit)
        return []

    def split(self, record: RawRecord, emit: Emit) -> None:
        try:
            event = decode_upload(record.key, record.value)
        except InvalidRecord as exc:
            emit(self.failures.reject(record, exc.error_type, str(exc)))
            return
        version = record.position.offset
        if event is None:
            assert record.key is not None
            deleted = DocumentDeleted(document=DocumentRef(document_id=record.key, version=version))
            emit(OutRecord(self.topics.pages, record.key, encode(deleted)))
            return
        ref = DocumentRef(
            document_id=event.document_id,
            version=version,
            filename=event.display_name(),
            blob_uri=event.blob_uri,
            metadata=event.metadata,
        )
        try:
            self._render(ref, event.content_type, record, emit)
        except (BlobError, DocumentError) as exc:
            self._fail_document(ref, record, exc.error_type, str(exc), emit)
        except Exception as exc:  # one document must never take the stage down
            log.exception("splitter: unexpected failure on %s", ref.document_id)
            self._fail_document(ref, record, type(exc).__name__, f"unexpected: {exc}", emit)

    def _render(self, ref: DocumentRef, content_type: str | None, record: RawRecord, emit: Emit) -> None:
        assert ref.blob_uri is not None
        with (
            self.blob_store.download(ref.blob_uri, self.settings.limits.max_blob_bytes) as blob,
            renderable(blob, content_type, ref.filename, self.converter) as (path, kind),
        ):
            # Opened in a render worker: a file that hangs or crashes PDFium costs that worker only.
            info = self.renderer.inspect(path, kind)
            for result in self.renderer.render_document(path, kind, info.page_count, self.target):
                if isinstance(result, RenderedPage):
                    emit(self._page_task(ref, result, info.page_count))
                else:
                    self._fail_page(ref, record, result, info.page_count, emit)

    def _page_task(self, ref: DocumentRef, page: RenderedPage, total_pages: int) -> OutRecord:
        limit = self.topics.pages_max_message_bytes - _ENVELOPE_ALLOWANCE
        inline_size = (len(page.data) + 2) // 3 * 4
        image_b64: str | None = None
        image_ref: str | None = None
        if inline_size <= limit:
            image_b64 = base64.b64encode(page.data).decode("ascii")
        else:
            # Claim check: too big for the topic, so the bytes go to blob storage and
            # the event carries the reference.
            # Per document and version, in names that fit any file system (infra/blob_names.py).
            name = f"{claim_blob_dir(ref.document_id, ref.version)}/page-{page.page_number}.{page.image_format}"
            image_ref = self.blob_store.put_bytes(name, page.data, content_type=f"image/{page.image_format}")
        task = PageTask(
            document=ref,
            page_number=page.page_number,
            total_pages=total_pages,
            width=page.width,
            height=page.height,
            image_format=page.image_format,
            image_b64=image_b64,
            image_ref=image_ref,
        )
        return OutRecord(self.topics.pages, ref.document_id, encode(task))

    def _fail_page(
        self, ref: DocumentRef, record: RawRecord, failure: PageFailure, total_pages: int, emit: Emit
    ) -> None:
        letter, failed = self.failures.page(
            record, ref, page_number=failure.page_number, total_pages=total_pages,
            error_type=failure.error_type, message=failure.message,
            dead_letter_message=f"page {failure.page_number}: {failure.message}",
        )
        emit(letter)
        emit(self.failures.downstream(self.topics.pages, failed))

    def _fail_document(
        self, ref: DocumentRef, record: RawRecord, error_type: str, message: str, emit: Emit
    ) -> None:
        letter, failed = self.failures.document(record, ref, error_type=error_type, message=message)
        emit(letter)
        emit(self.failures.downstream(self.topics.pages, failed))


def build_splitter(settings: ColstreamSettings, **runner_options: Any) -> StageRunner:
    """``runner_options`` go to :class:`StageRunner` (injected clients in tests)."""
    tunables = settings.splitter
    handler = SplitterHandler(
        settings,
        blob_store=open_blob_store(settings),
        renderer=StreamingRenderer(processes=tunables.render_processes, limits=settings.limits),
        target=render_target_for(settings.model),
        converter=OfficeConverter(settings.converter),
    )
    return StageRunner(
        settings,
        handler,
        topics=[settings.topics.uploads],
        group_id=f"{settings.consumer_group_prefix}splitter",
        # One upload per batch by default: a rebalance waits for the batch in flight,
        # so this bounds that wait by one document (max_pages).
        batch_size=tunables.batch_size,
        batch_timeout_ms=tunables.batch_timeout_ms,
        max_in_flight=tunables.max_in_flight,
        **runner_options,
    )
