"""What a stage does with input it cannot process, written once for all three stages.

Every refusal becomes a dead letter on ``documents.dlq`` carrying the original key
and value, so it can be read, fixed and redriven. When the refused input belongs
to a document, the stage also tells the stages after it, so that the document
still completes (``partial`` or ``failed``) instead of waiting forever for a page:

* :meth:`StageFailures.reject`: a record that is not even a valid message;
* :meth:`StageFailures.page`: one page cannot be indexed -> dead letter + ``PageFailed``;
* :meth:`StageFailures.document`: nothing of a version can be indexed -> dead letter
  + ``DocumentFailed``, so the sink purges older versions' pages.

The splitter and embedder publish the failure message to their output topic; the
sink, the last stage, applies it to the index directly.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass

from colstream.infra.kafka import OutRecord, RecordPosition
from colstream.schemas import DeadLetter, DocumentFailed, DocumentRef, PageFailed, encode

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RawRecord:
    key: str | None
    value: bytes | None
    position: RecordPosition
    timestamp_ms: int | None = None


def dead_letter(
    stage: str,
    dlq_topic: str,
    record: RawRecord,
    error_type: str,
    message: str,
    *,
    document_id: str | None = None,
    version: int | None = None,
    page_number: int | None = None,
) -> OutRecord:
    """The dead letter for ``record``; the original key and value travel with it."""
    original_value: str | None = None
    original_b64: str | None = None
    if record.value is not None:
        try:
            original_value = record.value.decode("utf-8")
        except UnicodeDecodeError:
            original_b64 = base64.b64encode(record.value).decode("ascii")
    letter = DeadLetter(
        stage=stage,
        error_type=error_type,
        message=message,
        source_topic=record.position.topic,
        source_partition=record.position.partition,
        source_offset=record.position.offset,
        original_key=record.key,
        original_value=original_value,
        original_value_b64=original_b64,
        document_id=document_id,
        version=version,
        page_number=page_number,
    )
    log.warning("dead-letter %s %s@%s/%s: %s: %s", stage, record.position.topic,
                record.position.partition, record.position.offset, error_type, message)
    return OutRecord(dlq_topic, record.key or document_id, encode(letter))


@dataclass(frozen=True)
class StageFailures:
    """Dead letters and downstream failure messages of one stage."""

    stage: str
    dlq_topic: str

    def reject(self, record: RawRecord, error_type: str, message: str) -> OutRecord:
        """A record that belongs to no document we can name: only the dead letter."""
        return dead_letter(self.stage, self.dlq_topic, record, error_type, message)

    def page(
        self,
        record: RawRecord,
        ref: DocumentRef,
        *,
        page_number: int,
        total_pages: int,
        error_type: str,
        message: str,
        dead_letter_message: str | None = None,
    ) -> tuple[OutRecord, PageFailed]:
        """One page failed: its dead letter, and the ``PageFailed`` that settles the page."""
        letter = dead_letter(self.stage, self.dlq_topic, record, error_type, dead_letter_message or message,
                             document_id=ref.document_id, version=ref.version, page_number=page_number)
        failed = PageFailed(document=ref, page_number=page_number, total_pages=total_pages,
                            stage=self.stage, error_type=error_type, message=message)
        return letter, failed

    def document(
        self, record: RawRecord, ref: DocumentRef, *, error_type: str, message: str
    ) -> tuple[OutRecord, DocumentFailed]:
        """A whole version failed: its dead letter, and the ``DocumentFailed`` that tells the
        sink this version has no pages (so an older version's pages do not look current)."""
        letter = dead_letter(self.stage, self.dlq_topic, record, error_type, message,
                             document_id=ref.document_id, version=ref.version)
        return letter, DocumentFailed(document=ref, stage=self.stage, error_type=error_type, message=message)

    @staticmethod
    def downstream(topic: str, message: PageFailed | DocumentFailed) -> OutRecord:
        """A failure message as a record for the next stage's topic, keyed like its document."""
        return OutRecord(topic, message.document.document_id, encode(message))
