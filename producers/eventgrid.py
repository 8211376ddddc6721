"""Azure Event Grid webhook: a blob dropped into storage becomes an upload event.

This is the core: parsing, the document id rule, ordering, duplicates and the shared
secret's check. :mod:`colstream.api.eventgrid` mounts it at ``/eventgrid`` (``POST``
for deliveries, ``OPTIONS`` for the CloudEvents abuse-protection handshake).

Schemas: the Event Grid schema (a JSON array of ``{id, eventType, subject,
eventTime, data, ...}``) and CloudEvents 1.0 (one event, or a batch as
``application/cloudevents-batch+json``); a batch may even mix the two.

Handshakes:

* ``Microsoft.EventGrid.SubscriptionValidationEvent`` is answered synchronously
  with ``{"validationResponse": <validationCode>}``. When the event only carries a
  ``validationUrl``, we answer 200 and GET the URL in a background task. The URL must be
  ``https`` on an Event Grid host (``validation_host_suffixes``); anything else is
  refused, so a forged validation event cannot make us fetch arbitrary URLs.
* CloudEvents ``OPTIONS`` with ``WebHook-Request-Origin`` is answered with
  ``WebHook-Allowed-Origin`` when the origin is in ``allowed_origins``; a
  ``WebHook-Request-Callback`` gets the same guarded background GET.

Mapping:

* ``Microsoft.Storage.BlobCreated`` -> :class:`UploadEvent` for the blob URL
  (``data.url``), published with ``publisher.publish_upload``. Creates by the
  APIs in ``ignored_created_apis`` (ADLS ``CreateFile``: an empty file whose
  content arrives with a later ``FlushWithClose``) are skipped.
* ``Microsoft.Storage.BlobDeleted`` -> ``publisher.publish_delete(document_id)``
  (a tombstone on the uploads topic).
* Anything else is acknowledged and ignored.

document_id rule: ``settings.eventgrid.document_id_template`` (default
``"{container}/{blob}"``) is filled with ``account``, ``container``, ``blob``
(full blob name, '/' kept), ``name`` (last path segment) and ``stem`` (name
without extension). Each substituted value is escaped so the result always fits
``DOCUMENT_ID_PATTERN``: characters outside ``[A-Za-z0-9._:@/+-]`` become
``=XX`` per UTF-8 byte (``=`` itself becomes ``=3D``, so the mapping is
injective), and a second ``.`` of a ``..`` becomes ``=2E``. Example: blob
``reports/Q1 2026.pdf`` in ``docs`` -> ``docs/reports/Q1=202026.pdf``. The id comes
from the blob's address (``data.url``, checked against the blob allowlist) and
nothing else: fields the sender controls (``data.documentId``, ``data.metadata``,
``subject``) never choose which document an event creates or deletes. An event
whose id does not fit (too long, template starting with a symbol) is skipped and
reported, not retried: retrying cannot fix it.

Authentication: every request (``POST`` and ``OPTIONS``) must carry the shared
secret, as ``?key=<secret>`` on the subscription's webhook URL or in the
``X-Colstream-Eventgrid-Key`` delivery header; both are compared in constant time
(digests of equal length). :func:`colstream.api.eventgrid.build_eventgrid_router` refuses to build a route
without a secret unless ``allow_unauthenticated`` is set explicitly.

Envelopes are read by the Azure SDK (``azure.eventgrid.EventGridEvent`` for the
Event Grid schema, ``azure.core.messaging.CloudEvent`` for CloudEvents 1.0).

Duplicates: Event Grid delivers at least once. An event whose ``id`` was already
applied is dropped (bounded LRU of ``dedupe_capacity`` ids); so is one whose
``sequencer`` equals the last applied one for that blob (the same storage change
delivered by another subscription, i.e. the same ``(eTag, sequencer)``).
Downstream is idempotent anyway (the uploads topic is compacted and the sink
applies latest-wins), so a duplicate that slips through costs work, not
correctness.

Ordering: Event Grid is unordered. Storage stamps each blob change with a
``sequencer``: an opaque hex string that, compared as a string, orders the
changes of one blob name. We keep the highest sequencer applied per blob
(account/container/blob) and drop any event whose sequencer is not higher.
So a BlobDeleted is never applied over a newer BlobCreated, and a late
BlobCreated that arrives after the BlobDeleted that followed it is ignored.
Events without a sequencer (hand-made CloudEvents) cannot be ordered and are
applied in arrival order. Sequencer state lives in this process (bounded by
``dedupe_capacity`` blobs, least recently touched evicted first), so the rule
holds per replica; run one replica, or route a storage account's subscription
to one replica, when strict ordering across restarts matters.

An event is recorded as applied only after the publisher returned, so if
publishing fails we answer 503 and Event Grid's retry gets a fresh chance. One
lock serialises check -> publish -> record, so two concurrent deliveries for the
same blob cannot overtake each other between the check and the publish.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import unquote, urlsplit

from azure.core.messaging import CloudEvent
from azure.eventgrid import EventGridEvent
from cachetools import LRUCache

from colstream.infra.blobstore import AzureBlob, BlobError, resolve_blob_uri
from colstream.infra.settings import BlobSettings, EventGridSettings
from colstream.schemas.events import UploadEvent
from colstream.schemas.ids import is_valid_document_id

log = logging.getLogger(__name__)

VALIDATION_EVENT = "Microsoft.EventGrid.SubscriptionValidationEvent"
BLOB_CREATED = "Microsoft.Storage.BlobCreated"
BLOB_DELETED = "Microsoft.Storage.BlobDeleted"

_SAFE_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@/+-")
_SUBJECT_RE = re.compile(r"^/blobServices/default/containers/(?P<container>[^/]+)/blobs/(?P<blob>.+)$")


class Publisher(Protocol):
    def publish_upload(self, event: UploadEvent) -> None: ...

    def publish_delete(self, document_id: str) -> None: ...




# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class IncomingEvent:
    """One event, whichever schema it came in."""

    id: str
    type: str
    subject: str
    data: dict[str, Any]
    schema: Literal["eventgrid", "cloudevents"]
    source: str | None = None


class DeliveryError(ValueError):
    """The request body is not an Event Grid or CloudEvents delivery (HTTP 400)."""


def _event_data(data: Any) -> dict[str, Any]:
    if isinstance(data, bytes | bytearray):  # CloudEvents data_base64, decoded by the SDK
        data = data.decode("utf-8", "replace")
    if isinstance(data, str):  # some publishers send data as a JSON string
        try:
            data = json.loads(data)
        except ValueError:
            data = {"value": data}
    return data if isinstance(data, dict) else {}


def _parse_one(index: int, item: Any) -> IncomingEvent:
    if not isinstance(item, dict):
        raise DeliveryError(f"event #{index} is not a JSON object")
    event_id: object
    event_type: object
    subject: object
    data: object
    source: object
    if "specversion" in item:
        if str(item.get("specversion")) != "1.0":
            raise DeliveryError(f"event #{index}: unsupported CloudEvents specversion {item.get('specversion')!r}")
        try:
            cloud: CloudEvent[Any] = CloudEvent.from_dict(item)
        except (ValueError, TypeError, KeyError) as error:
            raise DeliveryError(f"event #{index} is not a CloudEvents 1.0 event: {error}") from error
        event_id, event_type, subject, data, source = cloud.id, cloud.type, cloud.subject, cloud.data, cloud.source
        schema: Literal["eventgrid", "cloudevents"] = "cloudevents"
    elif "eventType" in item:
        try:
            grid = EventGridEvent.from_dict(item)
        except (ValueError, TypeError, KeyError) as error:
            raise DeliveryError(f"event #{index} is not an Event Grid event: {error}") from error
        event_id, event_type, subject, data, source = grid.id, grid.event_type, grid.subject, grid.data, grid.topic
        schema = "eventgrid"
    else:
        raise DeliveryError(f"event #{index} has neither 'eventType' (Event Grid) nor 'specversion' (CloudEvents)")
    if not isinstance(event_type, str) or not event_type:
        raise DeliveryError(f"event #{index} has no event type")
    if not isinstance(event_id, str) or not event_id:
        raise DeliveryError(f"event #{index} has no id")
    return IncomingEvent(
        id=event_id,
        type=event_type,
        subject=subject if isinstance(subject, str) else "",
        data=_event_data(data),
        schema=schema,
        source=source if isinstance(source, str) else None,
    )


def parse_delivery(body: Any) -> list[IncomingEvent]:
    """Events of a delivery (one event or a batch, either schema), read with the Azure SDK."""
    items = body if isinstance(body, list) else [body]
    return [_parse_one(index, item) for index, item in enumerate(items)]


# --------------------------------------------------------------------------- document ids


def escape_id_part(value: str) -> str:
    out: list[str] = []
    for ch in value:
        if ch in _SAFE_ID_CHARS:
            out.append(ch)
        else:
            out.extend(f"={byte:02X}" for byte in ch.encode("utf-8"))
    escaped = "".join(out)
    while ".." in escaped:
        escaped = escaped.replace("..", ".=2E")
    return escaped


def derive_document_id(template: str, *, account: str, container: str, blob: str) -> str:
    name = blob.rsplit("/", 1)[-1]
    stem = name.rsplit(".", 1)[0] if "." in name[1:] else name
    fields = {"account": account, "container": container, "blob": blob, "name": name, "stem": stem}
    return template.format(**{key: escape_id_part(val) for key, val in fields.items()})


# --------------------------------------------------------------------------- blob addresses


@dataclass(frozen=True)
class BlobAddress:
    url: str
    account: str
    container: str
    blob: str

    @property
    def key(self) -> str:
        return f"{self.account}/{self.container}/{self.blob}"


def blob_address(event: IncomingEvent, blob_settings: BlobSettings) -> BlobAddress:
    """Where the event's blob lives, checked against the blob allowlist.

    Raises BlobError (BlobNotAllowed) for blobs the splitter would refuse anyway.
    """
    url = event.data.get("url")
    if not isinstance(url, str) or not url:
        raise BlobError("BlobNotAllowed", "blob event without data.url")
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    # ADLS Gen2 accounts report the dfs endpoint; the same blob is on the blob endpoint.
    if host.endswith(".dfs.core.windows.net") and "@" not in parts.netloc:
        url = url.replace(
            parts.netloc, parts.netloc.lower().replace(".dfs.core.windows.net", ".blob.core.windows.net"), 1
        )
    location = resolve_blob_uri(url, blob_settings)
    if not isinstance(location, AzureBlob):
        raise BlobError("BlobNotAllowed", "Event Grid blob events must point at Azure storage", url)
    # data.url is authoritative (it is what the splitter downloads); the subject
    # only serves as a cross-check in the logs.
    match = _SUBJECT_RE.match(event.subject)
    if match and unquote(match["container"]) != location.container:
        log.warning("eventgrid: subject %r and data.url %r disagree; using data.url", event.subject, url)
    return BlobAddress(url=url, account=location.account, container=location.container, blob=location.blob)


# --------------------------------------------------------------------------- state


def _sequencer_key(sequencer: str) -> str:
    # Storage sequencers are fixed-width hex; pad in case one is shorter, and fold
    # case so 'f5ca' and 'F5CA' compare the same.
    return sequencer.strip().upper().rjust(64, "0")


@dataclass
class DeliveryOutcome:
    validation_response: str | None = None
    validation_url: str | None = None
    uploads: list[str] = field(default_factory=list)  # document ids published as uploads
    deletes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (event id, reason)


class EventGridProcessor:
    """Pure core: events in, publisher calls out; no HTTP, no Kafka."""

    def __init__(
        self, settings: EventGridSettings, blob_settings: BlobSettings, publisher: Publisher
    ) -> None:
        self.settings = settings
        self.blob_settings = blob_settings
        self.publisher = publisher
        # Bounded LRU memories: ids already applied, and the last sequencer per blob.
        self._seen_ids: LRUCache[str, str] = LRUCache(maxsize=max(1, settings.dedupe_capacity))
        self._sequencers: LRUCache[str, str] = LRUCache(maxsize=max(1, settings.dedupe_capacity))
        self._lock = threading.Lock()
        # Fail at startup, not on the first event, when the template is wrong.
        try:
            derive_document_id(
                settings.document_id_template, account="acct", container="docs", blob="a/b.pdf"
            )
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"COLSTREAM_EVENTGRID__DOCUMENT_ID_TEMPLATE {settings.document_id_template!r} is invalid "
                f"({error!r}); fields: {{account}} {{container}} {{blob}} {{name}} {{stem}}"
            ) from error

    def handle(self, body: Any) -> DeliveryOutcome:
        return self.process(parse_delivery(body))

    def process(self, events: Iterable[IncomingEvent]) -> DeliveryOutcome:
        outcome = DeliveryOutcome()
        for event in events:
            if event.type == VALIDATION_EVENT:
                self._validation(event, outcome)
            elif event.type in (BLOB_CREATED, BLOB_DELETED):
                self._blob_event(event, outcome)
            else:
                outcome.skipped.append((event.id, f"event type {event.type} is not handled"))
        return outcome

    def _validation(self, event: IncomingEvent, outcome: DeliveryOutcome) -> None:
        code = event.data.get("validationCode")
        url = event.data.get("validationUrl")
        if isinstance(code, str) and code:
            outcome.validation_response = code
        elif isinstance(url, str) and url:
            if not is_event_grid_url(url, self.settings):
                outcome.skipped.append((event.id, "validationUrl is not an https Event Grid URL; refused"))
                log.warning("eventgrid: refused validationUrl on host %r", urlsplit(url).hostname)
            else:
                outcome.validation_url = url
        else:
            outcome.skipped.append((event.id, "validation event without validationCode or validationUrl"))

    def _blob_event(self, event: IncomingEvent, outcome: DeliveryOutcome) -> None:
        created = event.type == BLOB_CREATED
        if created and event.data.get("api") in self.settings.ignored_created_apis:
            outcome.skipped.append(
                (event.id, f"BlobCreated by {event.data.get('api')} carries no content yet")
            )
            return
        try:
            address = blob_address(event, self.blob_settings)
        except BlobError as error:
            outcome.skipped.append((event.id, error.message))
            log.warning("eventgrid: skipped %s %s: %s", event.type, event.id, error)
            return
        # Only the blob's address names the document: never a field the sender filled in.
        document_id = derive_document_id(
            self.settings.document_id_template,
            account=address.account,
            container=address.container,
            blob=address.blob,
        )
        if not is_valid_document_id(document_id):
            reason = (
                f"document_id {document_id[:80]!r} derived for {address.key} does not fit DOCUMENT_ID_PATTERN"
            )
            outcome.skipped.append((event.id, reason))
            log.error("eventgrid: %s; adjust COLSTREAM_EVENTGRID__DOCUMENT_ID_TEMPLATE", reason)
            return
        sequencer = event.data.get("sequencer")
        sequencer = _sequencer_key(sequencer) if isinstance(sequencer, str) and sequencer.strip() else None

        with self._lock:
            if event.id in self._seen_ids:
                outcome.skipped.append((event.id, "duplicate delivery (event id already applied)"))
                return
            applied = self._sequencers.get(address.key)
            if sequencer is not None and applied and sequencer <= applied:
                why = (
                    "duplicate (same sequencer)"
                    if sequencer == applied
                    else "stale (older sequencer than applied)"
                )
                outcome.skipped.append((event.id, f"{why} for {address.key}"))
                self._seen_ids[event.id] = ""
                return
            if created:
                self.publisher.publish_upload(self._upload_event(document_id, address, event))
                outcome.uploads.append(document_id)
            else:
                self.publisher.publish_delete(document_id)
                outcome.deletes.append(document_id)
            # Recorded only after the publisher returned: a failed publish is retried.
            self._seen_ids[event.id] = ""
            if sequencer is not None:
                self._sequencers[address.key] = sequencer

    @staticmethod
    def _upload_event(document_id: str, address: BlobAddress, event: IncomingEvent) -> UploadEvent:
        content_type = event.data.get("contentType")
        metadata: dict[str, Any] = {"source": "eventgrid", "container": address.container}
        for key in ("eTag", "sequencer", "contentLength"):
            if event.data.get(key) is not None:
                metadata[key] = event.data[key]
        return UploadEvent(
            document_id=document_id,
            blob_uri=address.url,
            filename=address.blob.rsplit("/", 1)[-1][:1024],
            content_type=content_type[:255] if isinstance(content_type, str) and content_type else None,
            metadata=metadata,
        )


def is_event_grid_url(url: str, settings: EventGridSettings) -> bool:
    """Only https URLs on Event Grid's own hosts may be fetched for validation."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return False
    host = (parts.hostname or "").lower()
    return (
        parts.scheme == "https"
        and "@" not in parts.netloc
        and bool(host)
        and not any(ch.isspace() for ch in url)
        and any(
            host.endswith(suffix.lower()) and len(host) > len(suffix)
            for suffix in settings.validation_host_suffixes
        )
    )


# --------------------------------------------------------------------------- authentication


KEY_HEADER = "X-Colstream-Eventgrid-Key"


class EventGridNotSecured(RuntimeError):
    """No shared secret is configured and unauthenticated deliveries were not allowed."""


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8")).digest()


def delivery_authorised(settings: EventGridSettings, query_key: str | None, header_key: str | None) -> bool:
    """Whether a request carries the shared secret; constant time, whatever the lengths."""
    if settings.shared_secret is None:
        return settings.allow_unauthenticated
    expected = _digest(settings.shared_secret.get_secret_value())
    # Both candidates are always compared, so timing never says which one was present.
    by_query = hmac.compare_digest(_digest(query_key or ""), expected) and bool(query_key)
    by_header = hmac.compare_digest(_digest(header_key or ""), expected) and bool(header_key)
    return by_query or by_header


def check_secured(settings: EventGridSettings) -> None:
    if settings.shared_secret is None and not settings.allow_unauthenticated:
        raise EventGridNotSecured(
            "the Event Grid webhook needs COLSTREAM_EVENTGRID__SHARED_SECRET (appended as ?key=... to the "
            "subscription's endpoint); set COLSTREAM_EVENTGRID__ALLOW_UNAUTHENTICATED=true to run it open"
        )
