"""The webhooks core: signing checked by the ``standardwebhooks`` library, who gets which
event, the egress allowlist with its SSRF rules, and the retry decisions."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from standardwebhooks import Webhook, WebhookVerificationError
from tenacity import RetryCallState, Retrying

from colstream.consumers.webhooks.core import (
    AttemptResult,
    EgressPolicy,
    WebhookNotAllowed,
    classify,
    parse_retry_after,
    plan_deliveries,
    retry_policy,
    signed_headers,
    webhook_id,
)
from colstream.infra.settings import WebhookEndpoint, WebhookSettings
from colstream.schemas import DocumentIndexed

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"x" * 32).decode()


def endpoint(**fields: Any) -> WebhookEndpoint:
    return WebhookEndpoint.model_validate({"url": "https://hooks.example.com/in", "secret": SECRET, **fields})


def event(state: str = "complete", tenant: str | None = "acme", **fields: Any) -> DocumentIndexed:
    metadata = {"tenant": tenant} if tenant is not None else None
    return DocumentIndexed.model_validate({"document_id": "doc-1", "version": 7, "state": state, "total_pages": 2,
                                           "indexed_pages": 2, "metadata": metadata, **fields})


# -- signing ------------------------------------------------------------------------
def test_a_signed_delivery_verifies_with_the_standardwebhooks_library() -> None:
    [delivery] = plan_deliveries(event(), [endpoint()])
    headers = signed_headers(delivery, datetime.now(UTC))
    assert headers["webhook-signature"].startswith("v1,")
    payload = Webhook(SECRET).verify(delivery.body, headers)
    assert payload["document_id"] == "doc-1" and payload["state"] == "complete"
    assert payload["metadata"] == {"tenant": "acme"}
    assert DocumentIndexed.model_validate(payload) == delivery.event


def test_a_forged_or_tampered_delivery_is_rejected_by_the_library() -> None:
    [delivery] = plan_deliveries(event(), [endpoint()])
    headers = signed_headers(delivery, datetime.now(UTC))
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER_SECRET).verify(delivery.body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(delivery.body.replace(b"doc-1", b"doc-2"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(delivery.body, {**headers, "webhook-id": "msg_other"})


def test_every_attempt_is_signed_afresh_with_the_same_id_and_body() -> None:
    [delivery] = plan_deliveries(event(), [endpoint()])
    now = datetime.now(UTC)
    first, later = signed_headers(delivery, now - timedelta(seconds=90)), signed_headers(delivery, now)
    assert first["webhook-id"] == later["webhook-id"] == delivery.webhook_id
    assert int(later["webhook-timestamp"]) - int(first["webhook-timestamp"]) == 90
    assert first["webhook-signature"] != later["webhook-signature"]
    Webhook(SECRET).verify(delivery.body, later)
    # An attempt signed long ago is refused by the receiver: a replay cannot reuse it.
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(SECRET).verify(delivery.body, signed_headers(delivery, now - timedelta(minutes=10)))


def test_the_webhook_id_follows_the_event_not_the_moment() -> None:
    one = event()
    replayed = event(at=one.at + timedelta(seconds=30))
    assert webhook_id(one) == webhook_id(replayed)
    assert webhook_id(one).startswith("msg_")
    assert webhook_id(event(state="deleted")) != webhook_id(one)
    assert webhook_id(event(version=8)) != webhook_id(one)


# -- who gets what ------------------------------------------------------------------
def test_endpoints_get_the_states_they_ask_for_and_every_state_by_default() -> None:
    everything, failures = endpoint(), endpoint(events=["failed", "partial"])
    assert everything.events == ["complete", "partial", "failed", "deleted"]
    for state in ("complete", "deleted"):
        assert [d.endpoint_index for d in plan_deliveries(event(state), [everything, failures])] == [0]
    assert [d.endpoint_index for d in plan_deliveries(event("failed"), [everything, failures])] == [0, 1]


def test_a_tenant_bound_endpoint_gets_only_its_tenants_documents() -> None:
    acme, globex, anyone = endpoint(tenant="acme"), endpoint(tenant="globex"), endpoint()
    endpoints = [acme, globex, anyone]
    assert [d.endpoint_index for d in plan_deliveries(event(tenant="acme"), endpoints)] == [0, 2]
    assert [d.endpoint_index for d in plan_deliveries(event(tenant="globex"), endpoints)] == [1, 2]
    assert [d.endpoint_index for d in plan_deliveries(event(tenant=None), endpoints)] == [2]
    # A list is not a tenant: no tenant-bound endpoint gets it.
    listed = event(tenant=None, metadata={"tenant": ["acme"]})
    assert [d.endpoint_index for d in plan_deliveries(listed, endpoints)] == [2]


def test_one_event_has_one_id_and_one_body_for_every_endpoint() -> None:
    deliveries = plan_deliveries(event(), [endpoint(), endpoint(url="https://other.example.com/")])
    assert len({d.webhook_id for d in deliveries}) == 1
    assert len({d.body for d in deliveries}) == 1
    assert json.loads(deliveries[0].body)["type"] == "document_indexed"


# -- where a webhook may go ---------------------------------------------------------
def refused(policy: EgressPolicy, url: str) -> str:
    with pytest.raises(WebhookNotAllowed) as caught:
        policy.check_url(url)
    assert caught.value.error_type == "WebhookNotAllowed"
    return caught.value.message


def test_listed_hosts_pass_on_their_port_and_nothing_else_does() -> None:
    policy = EgressPolicy(["hooks.example.com", "api.example.org:8443"])
    target = policy.check_url("https://Hooks.Example.com/in?team=7")
    assert (target.host, target.port, target.target, target.host_header) == (
        "hooks.example.com", 443, "/in?team=7", "hooks.example.com")
    assert policy.check_url("https://hooks.example.com:443/").port == 443
    assert policy.check_url("https://api.example.org:8443/x").host_header == "api.example.org:8443"
    assert "not in COLSTREAM_WEBHOOKS__ALLOWED_HOSTS" in refused(policy, "https://hooks.example.com:8443/")
    assert "not in COLSTREAM_WEBHOOKS__ALLOWED_HOSTS" in refused(policy, "https://api.example.org/")
    assert "not in" in refused(policy, "https://evil.example.net/")
    assert "not in" in refused(policy, "https://hooks.example.com.evil.net/")


def test_url_shapes_the_blob_policy_refuses_are_refused_here_too() -> None:
    policy = EgressPolicy(["hooks.example.com"], allow_http=True)
    assert "userinfo" in refused(policy, "https://hooks.example.com@evil.net/")
    assert "userinfo" in refused(policy, "https://user:pw@hooks.example.com/")
    assert "scheme" in refused(policy, "ftp://hooks.example.com/")
    assert "whitespace" in refused(policy, "https://hooks.example.com/a b")
    assert "control" in refused(policy, "https://hooks.example.com/\x00")
    assert "malformed" in refused(policy, "https://hooks.example.com:99999/")
    assert "fragment" in refused(policy, "https://hooks.example.com/#x")
    # The refusal never shows a query (it may hold a token).
    assert "s3cret" not in refused(policy, "https://evil.example.net/?token=s3cret")


def test_metadata_and_link_local_addresses_are_refused_even_when_listed() -> None:
    policy = EgressPolicy(["169.254.169.254", "169.254.10.1:8080", "[fe80::1]:80", "metadata.google.internal",
                           "[fd00:ec2::254]"], allow_http=True)
    assert "metadata" in refused(policy, "http://169.254.169.254/latest/meta-data/")
    assert "link-local" in refused(policy, "http://169.254.10.1:8080/")
    assert "link-local" in refused(policy, "http://[fe80::1]:80/")
    assert "metadata" in refused(policy, "http://metadata.google.internal/")
    assert "metadata" in refused(policy, "https://[fd00:ec2::254]/")


def test_loopback_only_when_a_loopback_host_is_listed() -> None:
    policy = EgressPolicy(["127.0.0.1:8080", "hooks.example.com", "localhost:9000"])
    target = policy.check_url("http://127.0.0.1:8080/hook")
    assert target.loopback_listed
    assert policy.check_addresses(target, ["127.0.0.1"]) == ["127.0.0.1"]
    assert "not in" in refused(policy, "http://127.0.0.1:8081/")
    assert "not in" in refused(policy, "http://[::1]:8080/")
    assert policy.check_url("http://localhost:9000/").loopback_listed
    # A listed name that resolves to loopback (DNS rebinding, a typo in DNS) is refused.
    public = policy.check_url("https://hooks.example.com/")
    with pytest.raises(WebhookNotAllowed, match="loopback"):
        policy.check_addresses(public, ["203.0.113.5", "127.0.0.1"])
    with pytest.raises(WebhookNotAllowed, match="metadata"):
        policy.check_addresses(public, ["::ffff:169.254.169.254"])
    with pytest.raises(WebhookNotAllowed, match="link-local"):
        policy.check_addresses(public, ["169.254.1.1"])
    with pytest.raises(WebhookNotAllowed, match="did not resolve"):
        policy.check_addresses(public, [])
    assert policy.check_addresses(public, ["203.0.113.5", "203.0.113.5", "10.0.0.4"]) == ["203.0.113.5", "10.0.0.4"]


def test_plain_http_needs_allow_http_except_to_a_listed_loopback_host() -> None:
    strict = EgressPolicy(["hooks.example.com:80", "127.0.0.1:8080"])
    assert "plain http" in refused(strict, "http://hooks.example.com/")
    assert strict.check_url("http://127.0.0.1:8080/").scheme == "http"
    assert EgressPolicy(["hooks.example.com:80"], allow_http=True).check_url("http://hooks.example.com/").port == 80


def test_allowed_host_entries_are_checked_when_settings_load() -> None:
    settings = WebhookSettings(allowed_hosts=[" Hooks.Example.com ", "[::1]:8080", "hooks.example.com"])
    assert settings.allowed_hosts == ["hooks.example.com", "[::1]:8080"]
    for bad in ("https://hooks.example.com", "hooks.example.com:0", "a b", "::1"):
        with pytest.raises(ValueError, match="webhook allowed host"):
            WebhookSettings(allowed_hosts=[bad])


def test_an_endpoint_secret_must_be_a_whsec_key() -> None:
    for bad in ("not-whsec", "whsec_@@@", "whsec_" + base64.b64encode(b"short").decode()):
        with pytest.raises(ValueError, match="webhook secret"):
            endpoint(secret=bad)


# -- retry decisions ----------------------------------------------------------------
@pytest.mark.parametrize(("result", "verdict"), [
    (AttemptResult(status=200), "delivered"),
    (AttemptResult(status=204), "delivered"),
    (AttemptResult(status=500), "retry"),
    (AttemptResult(status=503), "retry"),
    (AttemptResult(status=429), "retry"),
    (AttemptResult(status=404), "retry"),
    (AttemptResult(error="ConnectError"), "retry"),
    (AttemptResult(status=302, location="https://elsewhere.example/"), "give_up"),
    (AttemptResult(status=410), "give_up"),
    (AttemptResult(error="refused", refused=True), "give_up"),
])
def test_what_is_retried(result: AttemptResult, verdict: str) -> None:
    assert classify(result) == verdict


def test_retry_after_is_read_in_seconds_only() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert parse_retry_after("-1") is None
    assert parse_retry_after(None) is None


def last_result(state: RetryCallState) -> AttemptResult:
    assert state.outcome is not None
    result: AttemptResult = state.outcome.result()
    return result


def run_policy(settings: WebhookSettings, answers: list[AttemptResult]) -> tuple[AttemptResult, list[float]]:
    sleeps: list[float] = []
    remaining = list(answers)
    retrying = Retrying(**retry_policy(settings), sleep=sleeps.append,
                        retry_error_callback=last_result)
    return retrying(lambda: remaining.pop(0)), sleeps


def test_backoff_grows_exponentially_with_jitter_within_its_bounds() -> None:
    settings = WebhookSettings(backoff_initial_s=1.0, backoff_max_s=4.0, retry_for_s=3600)
    failures = [AttemptResult(status=503)] * 6
    seen: set[float] = set()
    for _ in range(20):
        last, sleeps = run_policy(settings, [*failures, AttemptResult(status=200)])
        assert last.status == 200 and len(sleeps) == 6
        for n, delay in enumerate(sleeps, start=1):
            bound = min(4.0, 1.0 * 2 ** (n - 1))
            assert bound / 2 <= delay <= bound
        seen.add(round(sleeps[2], 6))
    assert len(seen) > 1, "no jitter"


def test_retry_after_is_a_floor_up_to_the_cap() -> None:
    settings = WebhookSettings(backoff_initial_s=0.1, backoff_max_s=5.0, retry_for_s=3600)
    _, sleeps = run_policy(settings, [AttemptResult(status=429, retry_after_s=3), AttemptResult(status=503,
                                      retry_after_s=600), AttemptResult(status=200)])
    assert sleeps[0] >= 3 and sleeps[1] == 5.0


def test_retries_stop_within_the_bounded_time_and_keep_the_last_status() -> None:
    settings = WebhookSettings(backoff_initial_s=0.02, backoff_max_s=0.05, retry_for_s=0.3)
    calls = 0

    def always_down() -> AttemptResult:
        nonlocal calls
        calls += 1
        return AttemptResult(status=502 if calls < 3 else 503)

    started = time.monotonic()
    last = Retrying(**retry_policy(settings), retry_error_callback=last_result)(always_down)
    assert time.monotonic() - started < 0.3 + 0.1
    assert calls >= 3 and last.status == 503


def test_a_final_answer_is_not_retried() -> None:
    settings = WebhookSettings(backoff_initial_s=0.01, backoff_max_s=0.01, retry_for_s=60)
    last, sleeps = run_policy(settings, [AttemptResult(status=301, location="https://x.example/?t=1")])
    assert sleeps == [] and last.describe() == "HTTP 301 to https://x.example/?<redacted> (redirects are not followed)"
