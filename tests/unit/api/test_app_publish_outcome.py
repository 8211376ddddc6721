"""A publish that may have happened keeps its blob and says the outcome is unknown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError

from colstream.infra.kafka import DeliveryFailed, DeliveryOutcomeUnknown, OutRecord, ProducerClient
from colstream.infra.settings import ColstreamSettings
from tests.unit.api.test_app import PDF_BYTES, Api, api

__all__ = ["api"]


def stored_blobs(api: Api) -> list[Path]:
    root = Path(api.settings.blob.local_root)
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def post(api: Api, document_id: str) -> Any:
    return api.client.post(
        "/ingest/pdf",
        params={"wait": False},
        data={"document_id": document_id},
        files={"file": ("a.pdf", PDF_BYTES, "application/pdf")},
    )


def test_unacknowledged_publish_keeps_the_blob_and_says_the_outcome_is_unknown(api: Api) -> None:
    api.publisher.fail = DeliveryOutcomeUnknown("documents.uploads: not acknowledged within 60s")
    response = post(api, "doc-1")
    assert response.status_code == 504
    detail = response.json()["detail"]
    assert "outcome unknown" in detail and "same document_id is safe" in detail
    assert response.headers["Retry-After"]
    assert [p.read_bytes() for p in stored_blobs(api)] == [PDF_BYTES]
    # the retry the answer invites works and leaves both versions' blobs for the sink to settle
    api.publisher.fail = None
    assert post(api, "doc-1").status_code == 202
    assert len(stored_blobs(api)) == 2


def test_a_refused_publish_removes_the_blob(api: Api) -> None:
    api.publisher.fail = DeliveryFailed("documents.uploads: Broker: Message size too large")
    response = post(api, "doc-2")
    assert response.status_code == 503
    assert stored_blobs(api) == []


class SilentProducer:
    """Takes records and never acknowledges them (a broker that went away), or answers with ``error``."""

    def __init__(self, error: KafkaError | None = None) -> None:
        self.error = error
        self.pending: list[Any] = []

    def produce(self, topic: str, value: Any = None, key: Any = None, on_delivery: Any = None, **_: Any) -> None:
        self.pending.append((topic, on_delivery))

    def poll(self, timeout: float = -1) -> int:
        if self.error is not None:
            for topic, callback in self.pending:
                callback(self.error, FakeMessage(topic))
            self.pending.clear()
        return 0

    def flush(self, timeout: float = -1) -> int:
        return len(self.pending)


class FakeMessage:
    def __init__(self, topic: str) -> None:
        self._topic = topic

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return -1


def client(producer: SilentProducer) -> ProducerClient:
    settings = ColstreamSettings().updated(kafka={"bootstrap_servers": "127.0.0.1:1"})
    return ProducerClient(settings, factory=lambda _config: producer)


def test_producer_client_tells_unknown_from_failed() -> None:
    record = OutRecord("documents.uploads", "doc", b"{}")
    with pytest.raises(DeliveryOutcomeUnknown, match="not acknowledged"):
        client(SilentProducer()).send_and_wait(record, timeout_s=0.3)
    with pytest.raises(DeliveryOutcomeUnknown):
        client(SilentProducer(KafkaError(KafkaError._MSG_TIMED_OUT))).send_and_wait(record, timeout_s=5)
    with pytest.raises(DeliveryFailed) as refused:
        client(SilentProducer(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))).send_and_wait(record, timeout_s=5)
    assert not isinstance(refused.value, DeliveryOutcomeUnknown)
