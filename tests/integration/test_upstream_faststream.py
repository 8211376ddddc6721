"""The FastStream upstream client against FastStream's in-memory broker and a real Kafka.

Every behaviour test runs twice: once on ``TestKafkaBroker`` (what a service's own
unit tests would use) and once on the session's real broker, where records are
read back with a plain confluent-kafka consumer and DocumentIndexed events come
from the project's own producer, exactly as the sink sends them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from faststream.confluent import KafkaBroker, TestKafkaBroker
from faststream.confluent.annotations import KafkaMessage
from pydantic import SecretStr

from colstream.infra.kafka import OutRecord, ProducerClient, committed_offsets, ensure_topics
from colstream.infra.settings import ColstreamSettings
from colstream.producers.upstream import IndexedTimeout, UpstreamClient, build_broker, build_upstream
from colstream.schemas import DocumentIndexed, UploadEvent, decode_upload, encode
from tests.conftest import make_settings
from tests.harness import read_all

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]

Records = list[tuple[str | None, bytes | None]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Upstream:
    kind: str
    settings: ColstreamSettings
    broker: KafkaBroker
    client: UpstreamClient
    published_uploads: Callable[[], Awaitable[Records]]
    publish_indexed: Callable[[DocumentIndexed], Awaitable[None]]

    @property
    def assigns_versions(self) -> bool:
        return self.kind == "kafka"


@pytest.fixture(params=["in-memory", "kafka"])
async def upstream(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Upstream]:
    if request.param == "in-memory":
        async for harness in _in_memory(tmp_path):
            yield harness
    else:
        async for harness in _real_kafka(tmp_path, request.getfixturevalue("kafka_bootstrap")):
            yield harness


async def _in_memory(tmp_path: Path) -> AsyncIterator[Upstream]:
    settings = make_settings(tmp_path, "in-memory:9092")
    broker, client = build_upstream(settings)
    captured: Records = []

    # Stands in for the splitter: records the raw key and value FastStream hands over.
    @broker.subscriber(settings.topics.uploads)
    async def splitter_side(message: KafkaMessage) -> None:
        raw = message.raw_message
        assert not isinstance(raw, tuple), "a single-record subscriber"
        key = raw.key()
        captured.append((key.decode() if key is not None else None, raw.value()))

    async def published_uploads() -> Records:
        return list(captured)

    async def publish_indexed(event: DocumentIndexed) -> None:
        await broker.publish(encode(event), settings.topics.indexed, key=event.document_id)

    async with TestKafkaBroker(broker):
        await client.wait_ready()
        yield Upstream("in-memory", settings, broker, client, published_uploads, publish_indexed)


async def _real_kafka(tmp_path: Path, bootstrap: str) -> AsyncIterator[Upstream]:
    settings = make_settings(tmp_path, bootstrap)
    ensure_topics(settings)
    broker, client = build_upstream(settings)
    sink_producer = ProducerClient(settings)

    async def published_uploads() -> Records:
        return await asyncio.to_thread(read_all, settings, settings.topics.uploads)

    async def publish_indexed(event: DocumentIndexed) -> None:
        record = OutRecord(settings.topics.indexed, event.document_id, encode(event))
        await asyncio.to_thread(sink_producer.send_and_wait, record)

    try:
        async with client:
            yield Upstream("kafka", settings, broker, client, published_uploads, publish_indexed)
    finally:
        sink_producer.close()


def indexed(document_id: str, version: int, state: Any = "complete") -> DocumentIndexed:
    pages = 0 if state == "deleted" else 2
    return DocumentIndexed(
        document_id=document_id, version=version, state=state, total_pages=pages, indexed_pages=pages
    )


async def start_waiting(client: UpstreamClient, document_id: str, **kwargs: Any) -> asyncio.Task[DocumentIndexed]:
    task = asyncio.create_task(client.wait_indexed(document_id, **kwargs))
    # Let the task register its waiter before anything is published.
    await asyncio.sleep(0)
    return task


async def test_publish_upload_writes_the_record_the_splitter_decodes(upstream: Upstream) -> None:
    event = UploadEvent(
        document_id="contracts/2026/a.pdf",
        blob_uri="file:///blobs/contracts/2026/a.pdf",
        filename="a.pdf",
        content_type="application/pdf",
        metadata={"tenant": "acme", "labels": ["signed", "2026"], "pages": 2},
    )
    plain = UploadEvent(document_id="invoice-42", blob_uri="file:///blobs/invoice-42.pdf")

    first = await upstream.client.publish_upload(event)
    second = await upstream.client.publish_upload(plain)

    records = await upstream.published_uploads()
    by_key = dict(records)
    assert len(records) == len(by_key) == 2
    assert by_key == {
        event.document_id: event.model_dump_json(exclude_none=True).encode(),
        plain.document_id: plain.model_dump_json(exclude_none=True).encode(),
    }
    assert {key: decode_upload(key, value) for key, value in records} == {
        event.document_id: event,
        plain.document_id: plain,
    }
    if upstream.assigns_versions:
        assert isinstance(first, int) and isinstance(second, int)
    else:
        assert first is None and second is None


async def test_publish_delete_writes_a_null_value_tombstone(upstream: Upstream) -> None:
    document_id = "invoice-42"
    upload_version = await upstream.client.publish_upload(
        UploadEvent(document_id=document_id, blob_uri="file:///blobs/invoice-42.pdf")
    )
    delete_version = await upstream.client.publish_delete(document_id)

    records = await upstream.published_uploads()
    assert [key for key, _ in records] == [document_id, document_id]
    key, value = records[-1]
    assert value is None, "a delete must be a real tombstone, not an empty or JSON-null value"
    assert decode_upload(key, value) is None
    if upstream.assigns_versions:
        # Same key, same partition: the delete is a newer version than the upload.
        assert upload_version is not None and delete_version is not None
        assert delete_version > upload_version


async def test_wait_indexed_returns_the_event_for_that_document(upstream: Upstream) -> None:
    waiting = await start_waiting(upstream.client, "doc-a", timeout_s=30)

    await upstream.publish_indexed(indexed("doc-b", 7))
    await upstream.publish_indexed(indexed("doc-a", 3, "partial"))

    got = await waiting
    assert (got.document_id, got.version, got.state) == ("doc-a", 3, "partial")


async def test_wait_indexed_with_min_version_skips_older_versions(upstream: Upstream) -> None:
    client = upstream.client
    waiting = await start_waiting(client, "doc-a", timeout_s=30, min_version=5)

    await upstream.publish_indexed(indexed("doc-a", 4))
    await upstream.publish_indexed(indexed("doc-a", 5, "deleted"))

    got = await waiting
    assert (got.version, got.state) == (5, "deleted")
    # Already arrived: a later wait for the same version resolves without a new event.
    again = await client.wait_indexed("doc-a", timeout_s=1, min_version=5)
    assert again.version == 5
    with pytest.raises(IndexedTimeout):
        await client.wait_indexed("doc-a", timeout_s=1, min_version=6)


async def test_wait_indexed_times_out_with_a_clear_error(upstream: Upstream) -> None:
    waiting = await start_waiting(upstream.client, "never-indexed", timeout_s=1.5)
    await upstream.publish_indexed(indexed("someone-else", 1))

    with pytest.raises(TimeoutError) as raised:
        await waiting
    assert isinstance(raised.value, IndexedTimeout)
    message = str(raised.value)
    assert "'never-indexed'" in message and upstream.settings.topics.indexed in message and "1.5s" in message


async def test_publish_then_wait_round_trip(upstream: Upstream) -> None:
    """The usage the README shows: publish, then wait for that version to settle."""
    event = UploadEvent(document_id="report-1", blob_uri="file:///blobs/report-1.pdf")
    version = await upstream.client.publish_upload(event)
    settled_version = version if version is not None else 0

    # The sink's answer may arrive before the caller starts waiting.
    await upstream.publish_indexed(indexed("report-1", settled_version))
    got = await upstream.client.wait_indexed("report-1", timeout_s=30, min_version=settled_version)
    assert (got.document_id, got.version) == ("report-1", settled_version)


async def test_listener_commits_no_offsets(upstream: Upstream) -> None:
    """FastStream's confluent auto-commit was once always on (ag2ai/faststream#2610): check ours is off."""
    if not upstream.assigns_versions:
        pytest.skip("the in-memory broker has no consumer groups")
    (listener,) = upstream.broker.subscribers
    consumer = getattr(listener, "consumer", None)
    assert consumer is not None
    group = consumer.config["group.id"]
    assert consumer.config["enable.auto.commit"] is False
    waiting = await start_waiting(upstream.client, "doc-a", timeout_s=30)
    await upstream.publish_indexed(indexed("doc-a", 1))
    await waiting

    await upstream.client.stop()  # a consumer commits on close if it ever will
    # Read through a non-subscribing consumer of the group, not the admin API (librdkafka#5040).
    offsets = committed_offsets(upstream.settings, group, upstream.settings.topics.indexed)
    assert sum(high - low for _, low, high in offsets.values()) >= 1  # the listener did read a record...
    assert all(offset == -1 for offset, _, _ in offsets.values())  # ...and committed nothing


SECURITY_CASES = {
    "plaintext": {},
    "ssl-with-ca": {"security_protocol": "SSL", "ssl_ca_location": "/etc/ca.pem"},
    "sasl-plain": {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "PLAIN",
        "sasl_username": "u",
        "sasl_password": "p",
    },
    "scram-512-no-tls": {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "u",
        "sasl_password": "p",
        "ssl_ca_location": "/etc/ca.pem",
    },
    "oauthbearer": {"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER"},
}


@pytest.mark.parametrize("case", sorted(SECURITY_CASES))
def test_broker_gets_the_same_security_config_as_the_stages(case: str) -> None:
    security = {name: SecretStr(value) if name == "sasl_password" else value
                for name, value in SECURITY_CASES[case].items()}
    settings = ColstreamSettings().updated(kafka={"bootstrap_servers": "broker:9093", **security})

    def security_part(conf: dict[str, Any]) -> dict[str, Any]:
        part = {k: v for k, v in conf.items() if k.startswith(("security.", "sasl.", "ssl."))}
        part["security.protocol"] = str(part.get("security.protocol", "plaintext")).lower()
        return part

    expected = security_part(settings.kafka.common_config())
    connection = build_broker(settings).config.broker_config.connection_config
    assert security_part(connection.producer_config) == expected
    assert security_part(connection.consumer_config) == expected
    assert connection.producer_config["bootstrap.servers"] == "broker:9093"
    assert connection.producer_config["enable.idempotence"] is True
