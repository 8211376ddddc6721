"""Signed webhooks against the real broker and a real HTTP receiver on this machine.

The receiver verifies every request with the ``standardwebhooks`` library and answers
401 to one it cannot verify, so "accepted" below means "verified by the reference
implementation".
"""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition
from standardwebhooks import Webhook, WebhookVerificationError

from colstream.app import StageThreads, build_stage
from colstream.infra.kafka import OutRecord, ProducerClient, ensure_topics
from colstream.infra.settings import ColstreamSettings
from colstream.schemas import DocumentIndexed, encode
from tests.conftest import make_settings
from tests.fixtures.docs import make_pdf
from tests.harness import StageProcess, dead_letters, kcat_produce, pipeline_in_threads, upload_line, wait_for

pytestmark = pytest.mark.kafka

SECRET = "whsec_" + base64.b64encode(b"colstream-webhook-test-secret-32b").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"someone-else-entirely-secret-32b!").decode()


class Receiver:
    """A webhook receiver: per path, a script of failure statuses answered first; then it
    verifies with the library and answers 204 (or 401 when verification fails)."""

    def __init__(self, secret: str = SECRET) -> None:
        self.webhook = Webhook(secret)
        self.failures_first: dict[str, list[int]] = {}
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver.lock:
                    script = receiver.failures_first.get(self.path, [])
                    status = script.pop(0) if script else None
                    entry: dict[str, Any] = {"path": self.path, "headers": headers, "body": body,
                                             "status": status, "accepted": False}
                    receiver.requests.append(entry)
                if status is None:
                    try:
                        receiver.webhook.verify(body, headers)
                        entry["accepted"], status = True, 204
                    except WebhookVerificationError as exc:
                        entry["error"], status = str(exc), 401
                    entry["status"] = status
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    def accepted(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.at(path) if r["accepted"]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def with_webhooks(settings: ColstreamSettings, receiver: Receiver, endpoints: list[dict[str, Any]],
                  **extra: Any) -> ColstreamSettings:
    return settings.updated(webhooks={
        "endpoints": endpoints, "allowed_hosts": [f"127.0.0.1:{receiver.port}"],
        "backoff_initial_s": 0.2, "backoff_max_s": 1.0, "retry_for_s": 8.0, "timeout_s": 5.0, **extra,
    })


@pytest.fixture
def broker_settings(tmp_path: Path, kafka_bootstrap: str) -> ColstreamSettings:
    settings = make_settings(tmp_path, kafka_bootstrap)
    ensure_topics(settings)
    return settings


def publish_indexed(settings: ColstreamSettings, *events: DocumentIndexed) -> None:
    producer = ProducerClient(settings)
    try:
        for event in events:
            producer.send(OutRecord(settings.topics.indexed, event.document_id, encode(event)))
        producer.flush_or_raise(30)
    finally:
        producer.close()


def indexed(document_id: str, tenant: str | None = None, state: str = "complete") -> DocumentIndexed:
    return DocumentIndexed(document_id=document_id, version=1, state=state,  # type: ignore[arg-type]
                           total_pages=1, indexed_pages=1, metadata={"tenant": tenant} if tenant else None)


def committed(settings: ColstreamSettings) -> int:
    """Records the webhooks group has committed on the indexed topic, all partitions together."""
    topic = settings.topics.indexed
    consumer = Consumer({**settings.kafka.common_config(),
                         "group.id": f"{settings.consumer_group_prefix}webhooks", "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        offsets = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return sum(max(tp.offset, 0) for tp in offsets)
    finally:
        consumer.close()


class WebhooksStage:
    """The webhooks stage in a thread, as ``colstream run all`` runs it."""

    def __init__(self, settings: ColstreamSettings) -> None:
        self.threads = StageThreads()
        self.threads.start("webhooks", build_stage("webhooks", settings))

    def stop(self) -> None:
        self.threads.stop()
        assert not self.threads.failures, self.threads.failures


def test_an_indexed_document_reaches_the_receiver_signed_and_a_forgery_is_rejected(
    pipeline_settings: ColstreamSettings, receiver: Receiver
) -> None:
    """The whole pipeline, kcat upload to webhook: the sink's completion event carries the
    upload's tenant, and the receiver verifies it with the library."""
    settings = with_webhooks(pipeline_settings, receiver, [{"url": receiver.url("/hooks"), "secret": SECRET}])
    path = settings.blob.local_root / "report.pdf"
    path.write_bytes(make_pdf(2))
    with pipeline_in_threads(settings):
        kcat_produce(settings, settings.topics.uploads,
                     [upload_line("report", path.resolve().as_uri(), metadata={"tenant": "acme"})])
        [delivery] = wait_for(lambda: receiver.accepted("/hooks"), 180, what="a verified webhook")
    payload = Webhook(SECRET).verify(delivery["body"], delivery["headers"])
    assert payload["type"] == "document_indexed"
    assert (payload["document_id"], payload["state"], payload["total_pages"]) == ("report", "complete", 2)
    assert payload["metadata"] == {"tenant": "acme"}
    assert delivery["headers"]["webhook-id"].startswith("msg_")
    assert delivery["headers"]["webhook-signature"].startswith("v1,")
    assert delivery["headers"]["content-type"] == "application/json"

    # Forgeries: the same request signed with another secret, and a tampered body.
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER_SECRET).verify(delivery["body"], delivery["headers"])
    tampered = delivery["body"].replace(b"acme", b"evil")
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(tampered, delivery["headers"])
    # And the receiver, which verifies with the library, refuses a forged request on the wire.
    forged_at = datetime.now(UTC)
    forged = {"webhook-id": "msg_forged", "webhook-timestamp": str(int(forged_at.timestamp())),
              "webhook-signature": Webhook(OTHER_SECRET).sign("msg_forged", forged_at, delivery["body"].decode()),
              "content-type": "application/json"}
    answer = httpx.post(receiver.url("/hooks"), content=delivery["body"], headers=forged, timeout=10)
    assert answer.status_code == 401
    assert len(receiver.accepted("/hooks")) == 1
    assert not [d for d in dead_letters(settings) if d["stage"] == "webhooks"]


def test_a_receiver_that_fails_twice_then_succeeds_gets_exactly_one_accepted_delivery(
    broker_settings: ColstreamSettings, receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run alone, as ``colstream run webhooks`` in its own process."""
    receiver.failures_first["/flaky"] = [503, 500]
    settings = broker_settings
    monkeypatch.setenv("COLSTREAM_WEBHOOKS__ENDPOINTS", json.dumps([{"url": receiver.url("/flaky"), "secret": SECRET}]))
    monkeypatch.setenv("COLSTREAM_WEBHOOKS__ALLOWED_HOSTS", json.dumps([f"127.0.0.1:{receiver.port}"]))
    monkeypatch.setenv("COLSTREAM_WEBHOOKS__BACKOFF_INITIAL_S", "0.2")
    monkeypatch.setenv("COLSTREAM_WEBHOOKS__BACKOFF_MAX_S", "1.0")
    monkeypatch.setenv("COLSTREAM_METRICS__PORT", "0")
    stage = StageProcess("webhooks", settings, tmp_path).start()
    try:
        stage.wait_consuming(120)
        publish_indexed(settings, indexed("flaky-doc", tenant="acme"))
        wait_for(lambda: receiver.accepted("/flaky"), 60, what="the third attempt accepted")
        wait_for(lambda: committed(settings) == 1, 30, what="the commit after the 2xx")
    finally:
        stage.terminate()
        log = stage.log_tail()
    attempts = receiver.at("/flaky")
    assert [a["status"] for a in attempts] == [503, 500, 204], log
    assert len({a["headers"]["webhook-id"] for a in attempts}) == 1
    assert len({a["body"] for a in attempts}) == 1
    assert len(receiver.accepted("/flaky")) == 1
    assert not [d for d in dead_letters(settings) if d["stage"] == "webhooks"]


def test_a_tenant_bound_endpoint_receives_only_its_tenant(
    broker_settings: ColstreamSettings, receiver: Receiver
) -> None:
    settings = with_webhooks(broker_settings, receiver, [
        {"url": receiver.url("/acme"), "secret": SECRET, "tenant": "acme"},
        {"url": receiver.url("/globex"), "secret": SECRET, "tenant": "globex"},
        {"url": receiver.url("/all"), "secret": SECRET, "events": ["complete"]},
    ])
    stage = WebhooksStage(settings)
    try:
        publish_indexed(settings, indexed("a-1", "acme"), indexed("g-1", "globex"), indexed("n-1"),
                        indexed("a-2", "acme", state="deleted"))
        wait_for(lambda: committed(settings) == 4, 60, what="all four events committed")
    finally:
        stage.stop()

    def ids(path: str) -> list[str]:
        return sorted(json.loads(r["body"])["document_id"] for r in receiver.accepted(path))

    assert ids("/acme") == ["a-1", "a-2"]
    assert ids("/globex") == ["g-1"]
    assert ids("/all") == ["a-1", "g-1", "n-1"]


def test_a_disallowed_host_is_dead_lettered_and_never_contacted(
    broker_settings: ColstreamSettings, receiver: Receiver
) -> None:
    unlisted = Receiver()
    try:
        settings = with_webhooks(broker_settings, receiver, [
            {"url": unlisted.url("/nope"), "secret": SECRET},
            {"url": f"http://localhost:{receiver.port}/by-name", "secret": SECRET},
            {"url": receiver.url("/ok"), "secret": SECRET},
        ])
        stage = WebhooksStage(settings)
        document_id = f"doc-{uuid.uuid4().hex[:6]}"
        try:
            publish_indexed(settings, indexed(document_id))
            wait_for(lambda: committed(settings) == 1, 60, what="the event committed")
        finally:
            stage.stop()
        assert unlisted.requests == []
        assert len(receiver.accepted("/ok")) == 1 and receiver.at("/by-name") == []
        letters = [d for d in dead_letters(settings) if d["stage"] == "webhooks"]
        assert sorted(d["error_type"] for d in letters) == ["WebhookNotAllowed", "WebhookNotAllowed"]
        assert all(d["document_id"] == document_id and d["source_topic"] == settings.topics.indexed
                   for d in letters)
        assert all("not in COLSTREAM_WEBHOOKS__ALLOWED_HOSTS" in d["message"] for d in letters)
    finally:
        unlisted.close()


def test_a_receiver_that_stays_down_is_dead_lettered_with_its_last_status(
    broker_settings: ColstreamSettings, receiver: Receiver
) -> None:
    receiver.failures_first["/down"] = [502] + [503] * 50
    settings = with_webhooks(broker_settings, receiver, [{"url": receiver.url("/down"), "secret": SECRET}],
                             retry_for_s=2.0, backoff_initial_s=0.1, backoff_max_s=0.4)
    stage = WebhooksStage(settings)
    try:
        publish_indexed(settings, indexed("down-doc"))
        wait_for(lambda: committed(settings) == 1, 60, what="the dead letter, then the commit")
    finally:
        stage.stop()
    [letter] = [d for d in dead_letters(settings) if d["stage"] == "webhooks"]
    assert letter["error_type"] == "WebhookDeliveryFailed"
    assert "last status: HTTP 503" in letter["message"]
    assert json.loads(letter["original_value"])["document_id"] == "down-doc"
    attempts = receiver.at("/down")
    assert len(attempts) >= 3 and len({a["headers"]["webhook-id"] for a in attempts}) == 1
