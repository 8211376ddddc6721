"""The webhooks stage's pure core: who gets which event, how it is signed, where it may
go, and what to do when a receiver fails. No sockets, no clock, no Kafka.

* :func:`plan_deliveries`: one :class:`Delivery` per endpoint that wants the event
  (its ``events`` name the event's state; a tenant-bound endpoint only gets documents
  whose ``metadata.tenant`` is its tenant);
* :func:`webhook_id`: the Standard Webhooks ``webhook-id``, derived from the event
  (document, version, state), so every retry, a replay of the topic after a crash
  and a redrive of the dead letter all carry the same id and receivers deduplicate;
* :func:`signed_headers`: ``webhook-id``, ``webhook-timestamp`` and
  ``webhook-signature: v1,<base64 HMAC-SHA256>`` made by the ``standardwebhooks``
  library. Each attempt is signed with its own timestamp (receivers refuse old ones),
  the id and the body stay the same;
* :class:`EgressPolicy`: the allowlist with the blob store's SSRF rules (see
  ``infra/blobstore.py``): ``http(s)`` only, no userinfo, no whitespace or control
  characters, the host must be listed (``host`` for the scheme's default port,
  ``host:port`` otherwise), link-local and cloud metadata addresses are refused even
  when listed, loopback only when a loopback host is listed explicitly. The addresses a
  name resolves to are checked too (:meth:`EgressPolicy.check_addresses`), and the
  request goes to the checked address, so DNS cannot swap it afterwards;
* :func:`classify`: 2xx delivered; a redirect (never followed), 410 Gone and 413 are
  final; every other answer and every network error is retried with exponential
  backoff and jitter (:func:`retry_policy`, tenacity) until ``retry_for_s`` runs out.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from standardwebhooks import Webhook
from tenacity import RetryCallState, retry_if_result, stop_before_delay, wait_exponential, wait_random_exponential
from tenacity.wait import wait_base

from colstream.infra.settings import WebhookEndpoint, WebhookSettings
from colstream.schemas import DocumentIndexed, PipelineError, encode
from colstream.schemas.uris import redact_uri

STAGE = "webhooks"
USER_AGENT = "colstream-webhooks/1"

# Addresses no webhook may reach, listed or not: instance metadata services answer
# on these and hand out cloud credentials.
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
_METADATA_NAMES = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data"})
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
_DEFAULT_PORTS = {"https": 443, "http": 80}


class WebhookNotAllowed(PipelineError):
    """A webhook URL (or what its host resolves to) that the egress policy refuses."""

    def __init__(self, url: str, why: str) -> None:
        super().__init__("WebhookNotAllowed", f"webhook URL {redact_uri(url)} refused: {why}")


# -- where a webhook may go ---------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A checked webhook URL, split the way the sender needs it."""

    url: str
    scheme: Literal["http", "https"]
    host: str  # lowercase; IPv6 without brackets
    port: int
    # path + query, as sent on the request line
    target: str
    # The matching allowlist entry names a loopback host: only then may it resolve to loopback.
    loopback_listed: bool

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    def url_for(self, address: str) -> str:
        """The URL with ``address`` (a checked IP) in place of the host name."""
        host = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{host}:{self.port}{self.target}"


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(value.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _never(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``address`` is refused whatever the allowlist says, or None."""
    if address in _METADATA_ADDRESSES:
        return f"{address} is a cloud metadata address"
    if address.is_link_local:
        return f"{address} is link-local"
    if address.is_unspecified or address.is_multicast:
        return f"{address} is not a unicast address"
    if isinstance(address, ipaddress.IPv4Address) and address == ipaddress.IPv4Address("255.255.255.255"):
        return f"{address} is the broadcast address"
    return None


def _is_loopback_name(host: str) -> bool:
    address = _ip(host)
    return address.is_loopback if address is not None else host in _LOOPBACK_NAMES or host.endswith(".localhost")


def _split_entry(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else None
    host, sep, port = entry.rpartition(":")
    return (host, int(port)) if sep else (entry, None)


class EgressPolicy:
    """``COLSTREAM_WEBHOOKS__ALLOWED_HOSTS`` and the SSRF rules, as pure checks."""

    def __init__(self, allowed_hosts: Sequence[str], *, allow_http: bool = False) -> None:
        self.allow_http = allow_http
        # host -> ports allowed (None: the scheme's default port)
        self._allowed: dict[str, set[int | None]] = {}
        for entry in allowed_hosts:
            host, port = _split_entry(entry.strip().lower())
            self._allowed.setdefault(host.rstrip("."), set()).add(port)

    @classmethod
    def from_settings(cls, settings: WebhookSettings) -> EgressPolicy:
        return cls(settings.allowed_hosts, allow_http=settings.allow_http)

    def check_url(self, url: str) -> Target:
        """The checked target of ``url``, or :class:`WebhookNotAllowed` saying why not."""
        if not url or len(url) > 2048:
            raise WebhookNotAllowed(url[:100], "empty or longer than 2048 characters")
        if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
            raise WebhookNotAllowed(url, "contains whitespace or control characters")
        try:
            parts = urlsplit(url)
            explicit_port = parts.port
        except ValueError as exc:
            raise WebhookNotAllowed(url, f"malformed URL ({exc})") from None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise WebhookNotAllowed(url, f"scheme {scheme!r} is not http or https")
        if "@" in parts.netloc or parts.username is not None or parts.password is not None:
            raise WebhookNotAllowed(url, "URLs with userinfo ('user@host') are refused")
        if parts.fragment:
            raise WebhookNotAllowed(url, "URLs with a fragment are refused")
        host = (parts.hostname or "").lower().rstrip(".")
        if not host:
            raise WebhookNotAllowed(url, "URL has no host")
        port = explicit_port if explicit_port is not None else _DEFAULT_PORTS[scheme]
        if host in _METADATA_NAMES:
            raise WebhookNotAllowed(url, f"{host} is a cloud metadata host")
        literal = _ip(host)
        if literal is not None and (why := _never(literal)) is not None:
            raise WebhookNotAllowed(url, why)
        ports = self._allowed.get(host)
        if ports is None or not (port in ports or (None in ports and port == _DEFAULT_PORTS[scheme])):
            shown = f"[{host}]" if ":" in host else host
            raise WebhookNotAllowed(
                url, f"{shown}:{port} is not in COLSTREAM_WEBHOOKS__ALLOWED_HOSTS (entries 'host' or 'host:port')")
        loopback = _is_loopback_name(host)
        if scheme == "http" and not (self.allow_http or loopback):
            raise WebhookNotAllowed(url, "plain http:// is refused (set COLSTREAM_WEBHOOKS__ALLOW_HTTP=true)")
        target = parts.path or "/"
        if parts.query:
            target = f"{target}?{parts.query}"
        return Target(url=url, scheme=scheme,  # type: ignore[arg-type]
                      host=host, port=port, target=target, loopback_listed=loopback)

    @staticmethod
    def check_addresses(target: Target, addresses: Sequence[str]) -> list[str]:
        """The addresses ``target``'s host resolved to, each checked; refused when any one
        is not allowed (a name with one bad address is not trusted with the others)."""
        if not addresses:
            raise WebhookNotAllowed(target.url, f"{target.host} did not resolve")
        checked: list[str] = []
        for raw in addresses:
            address = _ip(raw)
            if address is None:
                raise WebhookNotAllowed(target.url, f"{target.host} resolved to {raw!r}, not an IP address")
            if (why := _never(address)) is not None:
                raise WebhookNotAllowed(target.url, f"{target.host} resolves to {why}")
            if address.is_loopback and not target.loopback_listed:
                raise WebhookNotAllowed(
                    target.url, f"{target.host} resolves to loopback {address}; list a loopback host explicitly")
            checked.append(str(address))
        return list(dict.fromkeys(checked))


# -- who gets what ------------------------------------------------------------------
@dataclass(frozen=True)
class Delivery:
    """One event for one endpoint: the same id and body on every attempt."""

    endpoint_index: int
    endpoint: WebhookEndpoint
    event: DocumentIndexed
    webhook_id: str
    body: bytes

    @property
    def shown_url(self) -> str:
        return redact_uri(self.endpoint.url)


def event_tenant(event: DocumentIndexed) -> str | None:
    tenant = (event.metadata or {}).get("tenant")
    return tenant if isinstance(tenant, str) else None


def wants(endpoint: WebhookEndpoint, event: DocumentIndexed) -> bool:
    if event.state not in endpoint.events:
        return False
    return endpoint.tenant is None or event_tenant(event) == endpoint.tenant


def webhook_id(event: DocumentIndexed) -> str:
    digest = hashlib.sha256(f"{event.document_id}\n{event.version}\n{event.state}".encode()).hexdigest()
    return f"msg_{digest[:32]}"


def plan_deliveries(event: DocumentIndexed, endpoints: Sequence[WebhookEndpoint]) -> list[Delivery]:
    body = encode(event)
    wid = webhook_id(event)
    return [Delivery(i, endpoint, event, wid, body) for i, endpoint in enumerate(endpoints) if wants(endpoint, event)]


def signed_headers(delivery: Delivery, at: datetime) -> dict[str, str]:
    """The request headers of one attempt at ``at``."""
    at = at.astimezone(UTC)
    signature = Webhook(delivery.endpoint.secret.get_secret_value()).sign(
        delivery.webhook_id, at, delivery.body.decode("utf-8"))
    return {
        "webhook-id": delivery.webhook_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


# -- what to do with an answer ------------------------------------------------------
@dataclass(frozen=True)
class AttemptResult:
    """One attempt: an HTTP status, or an error before any status (``status`` None)."""

    status: int | None = None
    error: str | None = None
    retry_after_s: float | None = None
    location: str | None = None
    # The egress policy refused the target: nothing was sent.
    refused: bool = False

    def describe(self) -> str:
        if self.status is not None:
            where = f" to {redact_uri(self.location)} (redirects are not followed)" if self.location else ""
            return f"HTTP {self.status}{where}"
        return self.error or "no answer"


Verdict = Literal["delivered", "retry", "give_up"]
_FINAL_STATUSES = frozenset({410, 413})


def classify(result: AttemptResult) -> Verdict:
    if result.refused:
        return "give_up"
    if result.status is None:
        return "retry"
    if 200 <= result.status < 300:
        return "delivered"
    if 300 <= result.status < 400 or result.status in _FINAL_STATUSES:
        return "give_up"
    return "retry"


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (the delta form; an HTTP date is ignored)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 and seconds == seconds else None


class _RetryAfterFloor(wait_base):
    """The inner wait, but never less than the receiver's ``Retry-After`` (capped)."""

    def __init__(self, inner: wait_base, cap_s: float) -> None:
        self.inner = inner
        self.cap_s = cap_s

    def __call__(self, retry_state: RetryCallState) -> float:
        delay = self.inner(retry_state)
        outcome = retry_state.outcome
        if outcome is not None and not outcome.failed:
            result = outcome.result()
            if isinstance(result, AttemptResult) and result.retry_after_s is not None:
                delay = max(delay, min(result.retry_after_s, self.cap_s))
        return delay


def retry_policy(settings: WebhookSettings) -> dict[str, Any]:
    """The tenacity ``stop``, ``wait`` and ``retry`` of one delivery: attempts go on while
    :func:`classify` says ``retry`` and the next one would start within ``retry_for_s``
    of the first. The wait is half exponential (``backoff_initial_s * 2**(n-1)``, capped
    at ``backoff_max_s``) and half random up to the same bound, so receivers that failed
    together are not retried together; ``Retry-After`` is honoured up to the cap."""
    half_initial, half_max = settings.backoff_initial_s / 2, settings.backoff_max_s / 2
    wait = wait_exponential(multiplier=half_initial, max=half_max) + wait_random_exponential(
        multiplier=half_initial, max=half_max)
    return {
        "stop": stop_before_delay(settings.retry_for_s),
        "wait": _RetryAfterFloor(wait, settings.backoff_max_s),
        "retry": retry_if_result(lambda result: classify(result) == "retry"),
    }


@dataclass(frozen=True)
class DeliveryOutcome:
    delivery: Delivery
    delivered: bool
    attempts: int
    elapsed_s: float
    last: AttemptResult

    def failure_message(self) -> str:
        d = self.delivery
        return (f"webhook to {d.shown_url} (endpoint {d.endpoint_index}) not delivered after {self.attempts} "
                f"attempt(s) over {self.elapsed_s:.1f}s; last status: {self.last.describe()}; "
                f"webhook-id {d.webhook_id}")

    @property
    def error_type(self) -> str:
        return "WebhookNotAllowed" if self.last.refused else "WebhookDeliveryFailed"
