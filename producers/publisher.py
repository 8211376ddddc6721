"""The library API upstream services use to publish uploads and deletes.

Both operations are plain Kafka records on the uploads topic, keyed by
document_id: an upload is a JSON :class:`UploadEvent`, a delete is a tombstone
(same key, null value). Anything that can do that (kcat, kafka-console-producer,
another language's client) is an equally good producer.
"""

from __future__ import annotations

import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colstream.infra.blob_names import upload_blob_name
from colstream.infra.kafka import OutRecord, ProducerClient
from colstream.infra.settings import ColstreamSettings
from colstream.schemas import UploadEvent, encode
from colstream.schemas.ids import check_document_id


@dataclass(frozen=True)
class Published:
    topic: str
    key: str
    value: bytes | None
    partition: int | None = None
    # The record's offset is the document's version downstream.
    offset: int | None = None

    def describe(self) -> str:
        body = self.value.decode("utf-8") if self.value is not None else "<tombstone>"
        where = f" partition={self.partition} offset={self.offset}" if self.offset is not None else ""
        return f"{self.topic}{where} key={self.key} value={body}"


class UploadPublisher:
    def __init__(self, settings: ColstreamSettings, producer: ProducerClient | None = None) -> None:
        self.settings = settings
        self.producer = producer or ProducerClient(settings)

    def publish_upload(self, event: UploadEvent, *, wait: bool = True) -> Published:
        return self._publish(OutRecord(self.settings.topics.uploads, event.document_id, encode(event)), wait)

    def publish_delete(self, document_id: str, *, wait: bool = True) -> Published:
        # The id rule of uploads: a near-miss id (a trailing newline) must not delete another document.
        check_document_id(document_id)
        return self._publish(OutRecord(self.settings.topics.uploads, document_id, None), wait)

    def _publish(self, record: OutRecord, wait: bool) -> Published:
        assert record.key is not None
        if not wait:
            self.producer.send(record)
            return Published(record.topic, record.key, record.value)
        partition, offset = self.producer.send_and_wait(record, timeout_s=self.settings.kafka.publish_timeout_s)
        return Published(record.topic, record.key, record.value, partition, offset)

    def publish_file(
        self,
        path: Path,
        document_id: str,
        *,
        metadata: dict[str, Any] | None = None,
        content_type: str | None = None,
        wait: bool = True,
    ) -> Published:
        """Store a local file in the configured blob store, then announce it."""
        from colstream.infra.blobstore import open_blob_store

        content_type = content_type or mimetypes.guess_type(path.name)[0]
        store = open_blob_store(self.settings)
        check_document_id(document_id)
        uri = store.put_file(path, upload_blob_name(document_id, path.name), content_type=content_type)
        event = UploadEvent(
            document_id=document_id,
            blob_uri=uri,
            filename=path.name,
            content_type=content_type,
            metadata=metadata,
        )
        return self.publish_upload(event, wait=wait)

    def close(self) -> None:
        self.producer.close()
