"""The webhooks stage on the in-memory broker with a fake HTTP sender and DNS: commits
only after a 2xx or a dead letter, one id across retries, tenants, the allowlist, and
a slow endpoint that holds nobody else up."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook

from colstream.consumers.webhooks.core import Target
from colstream.consumers.webhooks.stage import WebhooksHandler, build_webhooks
from colstream.infra.settings import ColstreamSettings
from colstream.schemas import DocumentIndexed, encode
from colstream.testing import InMemoryBroker, RunningStage, wait_until

INDEXED, DLQ, GROUP = "indexed", "dlq", "t-webhooks"
SECRET_A = "whsec_" + base64.b64encode(b"a" * 32).decode()
SECRET_B = "whsec_" + base64.b64encode(b"b" * 32).decode()


class FakeReceivers:
    """Answers per host: a script of statuses (the last one repeats), optionally held on a gate."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[int]] = {}
        self.gates: dict[str, threading.Event] = {}
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.lock = threading.Lock()

    async def __call__(self, target: Target, address: str, headers: dict[str, str], body: bytes,
                       timeout_s: float) -> tuple[int, dict[str, str]]:
        gate = self.gates.get(target.host)
        while gate is not None and not gate.is_set():
            await asyncio.sleep(0.005)
        with self.lock:
            self.requests.append((target.host, address, headers, body))
            script = self.scripts.setdefault(target.host, [200])
            status = script.pop(0) if len(script) > 1 else script[0]
        return status, ({"location": "https://elsewhere.example/"} if 300 <= status < 400 else {})

    def to(self, host: str) -> list[tuple[dict[str, str], bytes]]:
        with self.lock:
            return [(h, b) for (target_host, _, h, b) in self.requests if target_host == host]


async def public_dns(host: str, port: int) -> list[str]:
    return {"a.example.com": ["203.0.113.10"], "b.example.com": ["203.0.113.11"],
            "rebound.example.com": ["127.0.0.1"]}.get(host, ["203.0.113.99"])


def settings_for(tmp_path: Path, endpoints: list[dict[str, Any]], **webhooks: Any) -> ColstreamSettings:
    return ColstreamSettings().updated(
        kafka={"bootstrap_servers": "in-memory"}, state_dir=tmp_path, shutdown={"grace_s": 3.0},
        topics={"indexed": INDEXED, "dlq": DLQ}, consumer_group_prefix="t-",
        webhooks={"endpoints": endpoints, "allowed_hosts": ["a.example.com", "b.example.com", "rebound.example.com"],
                  "backoff_initial_s": 0.01, "backoff_max_s": 0.02, "retry_for_s": 0.5, "batch_timeout_ms": 10,
                  **webhooks},
    )


def indexed(document_id: str, tenant: str | None = None, state: str = "complete") -> DocumentIndexed:
    return DocumentIndexed(document_id=document_id, version=3, state=state,  # type: ignore[arg-type]
                           total_pages=1, indexed_pages=1, metadata={"tenant": tenant} if tenant else None)


@pytest.fixture
def broker() -> InMemoryBroker:
    b = InMemoryBroker()
    b.create_topic(INDEXED)
    b.create_topic(DLQ)
    return b


@pytest.fixture
def receivers() -> FakeReceivers:
    return FakeReceivers()


@pytest.fixture
def start(broker: InMemoryBroker, receivers: FakeReceivers) -> Iterator[Callable[[ColstreamSettings], RunningStage]]:
    stages: list[RunningStage] = []

    def starter(settings: ColstreamSettings) -> RunningStage:
        runner = build_webhooks(settings, sender=receivers, resolver=public_dns,
                                consumer_factory=broker.consumer, producer_factory=broker.producer)
        stages.append(stage := RunningStage(runner))
        return stage

    yield starter
    for stage in stages:
        if stage.thread.is_alive():
            stage.stop()
    assert [stage.error for stage in stages if stage.error is not None] == []


def publish(broker: InMemoryBroker, *events: DocumentIndexed) -> None:
    for e in events:
        broker.append(INDEXED, e.document_id, encode(e))


def letters(broker: InMemoryBroker) -> list[dict[str, Any]]:
    return [json.loads(v) for v in broker.values(DLQ) if v is not None]


def test_a_delivery_is_signed_verifiable_and_committed_after_the_2xx(
    tmp_path: Path, broker: InMemoryBroker, receivers: FakeReceivers, start: Callable[..., RunningStage]
) -> None:
    stage = start(settings_for(tmp_path, [{"url": "https://a.example.com/hook?x=1", "secret": SECRET_A}]))
    event = indexed("doc-1", tenant="acme")
    publish(broker, event)
    wait_until(lambda: broker.committed_offset(f"{GROUP}", INDEXED) == 1)
    stage.stop()
    [(headers, body)] = receivers.to("a.example.com")
    assert DocumentIndexed.model_validate(Webhook(SECRET_A).verify(body, headers)) == event
    # The socket went to the address the policy checked; the name stayed in Host.
    assert receivers.requests[0][1] == "203.0.113.10"
    assert letters(broker) == []


def test_a_receiver_that_fails_twice_gets_one_accepted_delivery_with_one_id(
    tmp_path: Path, broker: InMemoryBroker, receivers: FakeReceivers, start: Callable[..., RunningStage]
) -> None:
    receivers.scripts["a.example.com"] = [503, 500, 200]
    stage = start(settings_for(tmp_path, [{"url": "https://a.example.com/", "secret": SECRET_A}]))
    publish(broker, indexed("doc-1"))
    wait_until(lambda: broker.committed_offset(GROUP, INDEXED) == 1)
    stage.stop()
    attempts = receivers.to("a.example.com")
    assert len(attempts) == 3
    assert len({h["webhook-id"] for h, _ in attempts}) == 1
    assert len({b for _, b in attempts}) == 1
    for headers, body in attempts:
        Webhook(SECRET_A).verify(body, headers)
    assert letters(broker) == []


def test_a_receiver_that_never_answers_2xx_is_dead_lettered_with_its_last_status(
    tmp_path: Path, broker: InMemoryBroker, receivers: FakeReceivers, start: Callable[..., RunningStage]
) -> None:
    receivers.scripts["a.example.com"] = [500, 503]
    stage = start(settings_for(tmp_path, [{"url": "https://a.example.com/?token=s3cret", "secret": SECRET_A}],
                               retry_for_s=0.3))
    publish(broker, indexed("doc-1"))
    wait_until(lambda: broker.committed_offset(GROUP, INDEXED) == 1)
    stage.stop()
    [letter] = letters(broker)
    assert letter["stage"] == "webhooks" and letter["error_type"] == "WebhookDeliveryFailed"
    assert "last status: HTTP 503" in letter["message"]
    assert "s3cret" not in letter["message"]
    assert letter["document_id"] == "doc-1" and letter["version"] == 3
    assert letter["source_topic"] == INDEXED and letter["source_offset"] == 0
    assert len(receivers.to("a.example.com")) >= 3


def test_a_redirect_is_not_followed_and_not_retried(
    tmp_path: Path, broker: InMemoryBroker, receivers: FakeReceivers, start: Callable[..., RunningStage]
) -> None:
    receivers.scripts["a.example.com"] = [302]
    stage = start(settings_for(tmp_path, [{"url": "https://a.example.com/", "secret": SECRET_A}], retry_for_s=30))
    publish(broker, indexed("doc-1"))
    wait_until(lambda: broker.committed_offset(GROUP, INDEXED) == 1)
    stage.stop()
    assert len(receivers.to("a.example.com")) == 1
    assert len(receivers.requests) == 1  # nothing went to elsewhere.example
    [letter] = letters(broker)
    assert "HTTP 302 to https://elsewhere.example/ (redirects are not followed)" in letter["message"]


def test_a_tenant_bound_endpoint_receives_only_its_tenant(
    tmp_path: Path, broker: InMemoryBroker, receivers: FakeReceivers, start: Callable[..., RunningStage]
) -> None:
    stage = start(settings_for(tmp_path, [
        {"url": "https://a.example.com/", "secret": SECRET_A, "tenant": "acme"},
        {"url": "https://b.example.com/", "secret": SECRET_B, "events": ["deleted"]},
    ]))
    publish(broker, indexed("acme-1", "acme"), indexed("globex-1", "globex"), indexed("untenanted"),
            indexed("acme-2", "acme", state="deleted"))
    wait_until(lambda: broker.committed_offset(GROUP, INDEXED) == 4)
    stage.stop()
    to_a = [json.loads(b)["document_id"] for _, b in receivers.to("a.example.com")]
    to_b = [json.loads(b)["document_id"] for _, b in receivers.to("b.example.com")]
    assert sorted(to_a) == ["acme-1", "acme-2"]
    assert to_b == ["acme-2"]


def test_a_disallowed_host_is_dead_lettered_without_a_request(
    tmp_path: Path, broker: InMemoryBroker, receivers: FakeReceivers, start: Callable[..., RunningStage]
) -> None:
    stage = start(settings_for(tmp_path, [
        {"url": "https://evil.example.net/steal", "secret": SECRET_A},
        {"url": "https://rebound.example.com/", "secret": SECRET_A},
        {"url": "https://b.example.com/", "secret": SECRET_B},
    ], retry_for_s=30))
    publish(broker, indexed("doc-1"))
    wait_until(lambda: broker.committed_offset(GROUP, INDEXED) == 1, timeout=5)
    stage.stop()
    assert [host for host, *_ in receivers.requests] == ["b.example.com"]
    messages = sorted(letter["message"] for letter in letters(broker))
    assert [letter["error_type"] for letter in letters(broker)] == ["WebhookNotAllowed"] * 2
    assert "not in COLSTREAM_WEBHOOKS__ALLOWED_HOSTS" in messages[0]
    assert "resolves to loopback 127.0.0.1" in messages[1]


def test_one_slow_endpoint_never_delays_another(
    tmp_path: Path, broker: InMemoryBroker, receivers: FakeReceivers, start: Callable[..., RunningStage]
) -> None:
    receivers.gates["a.example.com"] = gate = threading.Event()
    stage = start(settings_for(tmp_path, [
        {"url": "https://a.example.com/", "secret": SECRET_A},
        {"url": "https://b.example.com/", "secret": SECRET_B},
    ], batch_size=1, concurrency_per_endpoint=1))
    publish(broker, *(indexed(f"doc-{i}") for i in range(5)))
    # The fast endpoint gets every event while the slow one holds its first request.
    wait_until(lambda: len(receivers.to("b.example.com")) == 5)
    assert receivers.to("a.example.com") == []
    # Nothing is committed before the slow endpoint answered too.
    assert broker.committed_offset(GROUP, INDEXED) is None
    gate.set()
    wait_until(lambda: broker.committed_offset(GROUP, INDEXED) == 5)
    stage.stop()
    assert len(receivers.to("a.example.com")) == 5
    assert letters(broker) == []


def test_a_name_that_does_not_resolve_is_retried_then_dead_lettered(
    tmp_path: Path, broker: InMemoryBroker, receivers: FakeReceivers
) -> None:
    lookups: list[str] = []

    async def failing_dns(host: str, port: int) -> list[str]:
        lookups.append(host)
        raise OSError(-2, "Name or service not known")

    settings = settings_for(tmp_path, [{"url": "https://a.example.com/", "secret": SECRET_A}], retry_for_s=0.2)
    stage = RunningStage(build_webhooks(settings, sender=receivers, resolver=failing_dns,
                                        consumer_factory=broker.consumer, producer_factory=broker.producer))
    publish(broker, indexed("doc-1"))
    try:
        wait_until(lambda: broker.committed_offset(GROUP, INDEXED) == 1)
    finally:
        stage.stop()
    assert stage.error is None
    [letter] = letters(broker)
    assert letter["error_type"] == "WebhookDeliveryFailed"
    assert "DNS lookup of a.example.com failed" in letter["message"]
    assert len(lookups) >= 2 and receivers.requests == []


def test_an_invalid_record_is_dead_lettered_and_committed(
    tmp_path: Path, broker: InMemoryBroker, receivers: FakeReceivers, start: Callable[..., RunningStage]
) -> None:
    stage = start(settings_for(tmp_path, [{"url": "https://a.example.com/", "secret": SECRET_A}]))
    broker.append(INDEXED, "doc-x", b'{"document_id": "doc-x"}')
    publish(broker, indexed("doc-1"))
    wait_until(lambda: broker.committed_offset(GROUP, INDEXED) == 2)
    stage.stop()
    [letter] = letters(broker)
    assert letter["error_type"] == "InvalidIndexedEvent"
    assert [json.loads(b)["document_id"] for _, b in receivers.to("a.example.com")] == ["doc-1"]


def test_without_endpoints_events_are_committed_unsent(
    tmp_path: Path, broker: InMemoryBroker, receivers: FakeReceivers, start: Callable[..., RunningStage]
) -> None:
    stage = start(settings_for(tmp_path, []))
    publish(broker, indexed("doc-1"), indexed("doc-2"))
    wait_until(lambda: broker.committed_offset(GROUP, INDEXED) == 2)
    stage.stop()
    assert receivers.requests == [] and letters(broker) == []


def test_closing_cancels_deliveries_still_waiting(tmp_path: Path, receivers: FakeReceivers) -> None:
    receivers.gates["a.example.com"] = threading.Event()
    handler = WebhooksHandler(settings_for(tmp_path, [{"url": "https://a.example.com/", "secret": SECRET_A}]),
                              sender=receivers, resolver=public_dns)
    from colstream.infra.kafka import RecordPosition
    from colstream.infra.stage_runner import RawRecord

    record = RawRecord("doc-1", encode(indexed("doc-1")), RecordPosition(INDEXED, 0, 0))
    future = handler.submit([record], lambda _: None)
    time.sleep(0.05)
    assert future.cancel() or future.done()
    started = time.monotonic()
    handler.close()
    assert time.monotonic() - started < 5
    assert receivers.requests == []


# -- the real sender, over TLS on this machine --------------------------------------
def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_the_sender_connects_to_the_checked_address_and_verifies_tls_for_the_name(tmp_path: Path) -> None:
    import ssl
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from colstream.consumers.webhooks.core import EgressPolicy
    from colstream.consumers.webhooks.stage import HttpxSender

    cert, key = _self_signed(tmp_path, "hooks.test")
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            seen.append(self.headers["host"])
            self.send_response(302)
            self.send_header("location", "https://elsewhere.example/")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    async def post(name: str) -> tuple[int, dict[str, str]]:
        target = EgressPolicy([f"{name}:{port}"]).check_url(f"https://{name}:{port}/in")
        sender = HttpxSender(verify=ssl.create_default_context(cafile=str(cert)))
        try:
            return await sender(target, "127.0.0.1", {"webhook-id": "msg_1"}, b"{}", 5.0)
        finally:
            await sender.aclose()

    try:
        status, headers = asyncio.run(post("hooks.test"))
        # The name went to Host (and TLS), the socket to the address; the redirect was not followed.
        assert status == 302 and headers["location"] == "https://elsewhere.example/"
        assert seen == [f"hooks.test:{port}"]
        import httpx

        with pytest.raises(httpx.ConnectError, match="certificate"):
            asyncio.run(post("wrong.test"))
        assert len(seen) == 1
    finally:
        server.shutdown()
        server.server_close()
