"""Async client for upstream services, on FastStream's confluent-kafka broker.

The stages keep their own confluent-kafka runtime for commit-after-durable-write;
this module is the other side: a service that announces uploads and deletes and
then waits until the pipeline has settled them. It speaks exactly the records of
:class:`~colstream.producers.publisher.UploadPublisher` (key = document_id, value
= the upload JSON, or a null-value tombstone) and listens to
``documents.indexed``, where the sink publishes one :class:`DocumentIndexed` per
settled version.

The indexed listener is a fan-out reader, not a worker: each client joins its own
consumer group (every instance must see every event), starts at the end of the
topic, and never commits, so restarts leave no committed offsets behind.

Security mapping from :class:`KafkaSettings`: PLAIN and SCRAM-SHA-256/512 travel
as FastStream security objects (so they appear in the AsyncAPI document), plain
SSL as ``BaseSecurity(use_ssl=True)``. FastStream's confluent broker rejects an
``ssl_context``, so the CA file goes in as raw ``ssl.ca.location``; OAUTHBEARER
and GSSAPI (whose FastStream objects carry no credentials) go in as raw
``sasl.*`` config with the same values ``KafkaSettings.common_config()`` gives.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from typing import Any, cast

from cachetools import LRUCache
from confluent_kafka import OFFSET_END, Consumer, KafkaException, Message, TopicPartition
from faststream import AckPolicy
from faststream.confluent import KafkaBroker
from faststream.confluent.helpers.config import ConfluentConfig
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_fixed

from colstream.infra.settings import ColstreamSettings, KafkaSettings
from colstream.schemas import DocumentIndexed, UploadEvent, encode

log = logging.getLogger(__name__)

# How many documents' latest DocumentIndexed a client remembers, so a wait that
# starts after its event already arrived still resolves (see ``min_version``).
DEFAULT_REMEMBERED_DOCUMENTS = 10_000


class IndexedTimeout(TimeoutError):
    """No matching DocumentIndexed arrived in time."""


def broker_security(kafka: KafkaSettings) -> tuple[BaseSecurity | None, ConfluentConfig]:
    """FastStream's security object where one models the setting, raw confluent config for the rest."""
    use_ssl = kafka.security_protocol in ("SSL", "SASL_SSL")
    uses_sasl = kafka.security_protocol.startswith("SASL_")
    raw: dict[str, Any] = {}
    if kafka.ssl_ca_location:
        raw["ssl.ca.location"] = kafka.ssl_ca_location
    password = kafka.sasl_password.get_secret_value() if kafka.sasl_password is not None else None
    credential_classes: dict[str, type[SASLPlaintext] | type[SASLScram256] | type[SASLScram512]] = {
        "PLAIN": SASLPlaintext,
        "SCRAM-SHA-256": SASLScram256,
        "SCRAM-SHA-512": SASLScram512,
    }
    mechanism = (kafka.sasl_mechanism or "").upper()
    security: BaseSecurity | None
    if uses_sasl and mechanism in credential_classes and kafka.sasl_username and password is not None:
        security = credential_classes[mechanism](kafka.sasl_username, password, use_ssl=use_ssl)
    elif uses_sasl:
        # A mechanism FastStream models without credentials (OAUTHBEARER, GSSAPI) or
        # an incomplete one: hand librdkafka the same keys common_config() would.
        security = None
        raw["security.protocol"] = kafka.security_protocol.lower()
        if kafka.sasl_mechanism:
            raw["sasl.mechanism"] = kafka.sasl_mechanism
        if kafka.sasl_username:
            raw["sasl.username"] = kafka.sasl_username
        if password is not None:
            raw["sasl.password"] = password
    else:
        security = BaseSecurity(use_ssl=use_ssl)
    return security, cast(ConfluentConfig, raw)


def build_broker(settings: ColstreamSettings) -> KafkaBroker:
    """A FastStream broker with the project's producer guarantees (idempotent, acks=all)."""
    kafka = settings.kafka
    if not kafka.bootstrap_servers:
        raise RuntimeError("no Kafka broker configured: set KAFKA_BOOTSTRAP_SERVERS or run `colstream kafka start`")
    security, raw_config = broker_security(kafka)
    return KafkaBroker(
        kafka.bootstrap_servers,
        client_id=f"{kafka.client_id}-upstream",
        security=security,
        config=raw_config,
        acks="all",
        # Idempotence keeps per-key order on retries: an upload followed by its
        # delete must reach the topic in that order, as the sink's latest-wins needs.
        enable_idempotence=True,
        linger_ms=kafka.linger_ms,
        compression_type=None if kafka.compression_type == "none" else kafka.compression_type,
        max_request_size=kafka.message_max_bytes,
        # Topics belong to `colstream kafka topics` / ensure_topics (uploads must be
        # compacted); a subscriber must not create them with broker defaults.
        allow_auto_create_topics=False,
    )


class UpstreamClient:
    """Publish uploads and deletes; wait until the pipeline reports them settled.

    Versions: a published record's offset on the uploads topic is the version the
    sink reports in :class:`DocumentIndexed`. ``publish_*`` return it when the
    broker assigned one (FastStream's in-memory test broker assigns none).
    """

    def __init__(
        self,
        broker: KafkaBroker,
        settings: ColstreamSettings,
        *,
        remembered_documents: int = DEFAULT_REMEMBERED_DOCUMENTS,
    ) -> None:
        self.broker = broker
        self.settings = settings
        self._remembered_documents = remembered_documents
        # The newest DocumentIndexed of the most recently seen documents (an LRU).
        self._latest: LRUCache[str, DocumentIndexed] = LRUCache(maxsize=max(1, remembered_documents))
        self._waiters: dict[str, list[tuple[int | None, asyncio.Future[DocumentIndexed]]]] = {}
        # Set from the consumer's thread once its partitions are pinned to their ends.
        self._listening = threading.Event()

    async def publish_upload(self, event: UploadEvent) -> int | None:
        """Announce a new version of ``event.document_id``; returns its version when known."""
        return await self._publish(event.document_id, encode(event))

    async def publish_delete(self, document_id: str) -> int | None:
        """Publish a tombstone (null value) for ``document_id``; returns its version when known."""
        return await self._publish(document_id, None)

    async def _publish(self, document_id: str, value: bytes | None) -> int | None:
        delivered = await self.broker.publish(value, self.settings.topics.uploads, key=document_id)
        if isinstance(delivered, Message):
            offset = delivered.offset()
            return offset if offset is not None and offset >= 0 else None
        return None

    async def wait_indexed(
        self, document_id: str, *, timeout_s: float, min_version: int | None = None
    ) -> DocumentIndexed:
        """The DocumentIndexed for ``document_id`` that settles ``min_version`` or a newer one.

        With ``min_version`` (the version ``publish_*`` returned), an event that
        already arrived counts, so nothing is lost between publishing and waiting.
        Without it, the next event for the document after this call counts.
        """
        if min_version is not None:
            seen = self._latest.get(document_id)
            if seen is not None and seen.version >= min_version:
                return seen
        future: asyncio.Future[DocumentIndexed] = asyncio.get_running_loop().create_future()
        entry = (min_version, future)
        self._waiters.setdefault(document_id, []).append(entry)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            wanted = f" with version >= {min_version}" if min_version is not None else ""
            raise IndexedTimeout(
                f"no DocumentIndexed for {document_id!r}{wanted} on {self.settings.topics.indexed!r} "
                f"within {timeout_s:g}s"
            ) from None
        finally:
            waiting = self._waiters.get(document_id, [])
            if entry in waiting:
                waiting.remove(entry)
            if not waiting:
                self._waiters.pop(document_id, None)

    def deliver(self, event: DocumentIndexed) -> None:
        """Route one DocumentIndexed to whoever waits for it (the subscriber calls this)."""
        previous = self._latest.get(event.document_id)  # also marks it recently used
        if previous is None or event.version >= previous.version:
            self._latest[event.document_id] = event
        for min_version, future in self._waiters.get(event.document_id, []):
            if not future.done() and (min_version is None or event.version >= min_version):
                future.set_result(event)

    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Runs on the consumer's thread. Pinning each partition to its current end
        # (instead of letting auto.offset.reset=latest resolve it later) means every
        # event produced after wait_ready() returns is delivered. Raising here would
        # surface from poll() and stop the subscriber, so a partition whose end
        # cannot be read falls back to the reset policy.
        for partition in partitions:
            partition.offset = _end_offset(consumer, partition)
        consumer.assign(partitions)
        self._listening.set()

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Return once the indexed listener receives everything published from now on."""
        if not self._uses_real_consumer():
            # FastStream's in-memory broker hands messages to handlers synchronously.
            return
        ready = await asyncio.to_thread(self._listening.wait, timeout_s)
        if not ready:
            raise IndexedTimeout(
                f"listener on {self.settings.topics.indexed!r} got no partitions within {timeout_s:g}s"
            )

    def _uses_real_consumer(self) -> bool:
        return any(getattr(subscriber, "consumer", None) is not None for subscriber in self.broker.subscribers)

    async def start(self, timeout_s: float = 60.0) -> None:
        await self.broker.start()
        await self.wait_ready(timeout_s)

    async def stop(self) -> None:
        await self.broker.stop()
        self._listening.clear()

    async def __aenter__(self) -> UpstreamClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def _end_offset(consumer: Consumer, partition: TopicPartition, attempts: int = 20) -> int:
    # A just-created topic answers "not leader" until its leader is elected.
    retrying = Retrying(retry=retry_if_exception_type(KafkaException), wait=wait_fixed(0.25),
                        stop=stop_after_attempt(attempts), reraise=True)
    try:
        _, high = retrying(consumer.get_watermark_offsets, partition, timeout=5)
        return int(high)
    except KafkaException as exc:
        log.warning("end of %s[%d] unknown (%s); starting from the reset policy", partition.topic,
                    partition.partition, exc)
    return OFFSET_END


def build_upstream(
    settings: ColstreamSettings, *, broker: KafkaBroker | None = None
) -> tuple[KafkaBroker, UpstreamClient]:
    """A broker with the indexed listener registered, and the client that uses it.

    Pass your own ``broker`` to add the listener to an existing FastStream app.
    """
    broker = broker or build_broker(settings)
    client = UpstreamClient(broker, settings)

    async def on_indexed(msg: DocumentIndexed) -> None:
        client.deliver(msg)

    broker.subscriber(
        settings.topics.indexed,
        # Own group per client: a shared group would split the events between instances.
        group_id=f"{settings.consumer_group_prefix}upstream-{uuid.uuid4().hex[:12]}",
        auto_offset_reset="latest",
        # MANUAL with no ack: nothing is ever committed for this throwaway group.
        ack_policy=AckPolicy.MANUAL,
        on_assign=client.on_assign,
        title="indexed-listener",
    )(on_indexed)
    return broker, client
