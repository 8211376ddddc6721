"""``/eventgrid``: Azure Event Grid's webhook over HTTP.

The rules (envelopes, the document id, ordering, duplicates, the shared secret) are
the core's, :mod:`colstream.producers.eventgrid`; this module only speaks HTTP:

* ``OPTIONS /eventgrid`` answers the CloudEvents abuse-protection handshake;
* ``POST /eventgrid`` reads a bounded body, hands the events to the core and says
  what it published, or asks Event Grid to retry (503) when publishing failed.

Both need the shared secret (``?key=`` or the ``X-Colstream-Eventgrid-Key`` header).
A validation URL is fetched in a background task, only when it is https on an Event
Grid host, and never following redirects.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, BackgroundTasks, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from colstream.api.models import ErrorResponse
from colstream.infra.settings import ColstreamSettings, EventGridSettings
from colstream.producers.eventgrid import (
    KEY_HEADER,
    DeliveryError,
    EventGridProcessor,
    Publisher,
    check_secured,
    delivery_authorised,
    is_event_grid_url,
    parse_delivery,
)

log = logging.getLogger(__name__)

HttpGet = Callable[[str], Any]
_DOCUMENTED_ERROR: dict[str, Any] = {"model": ErrorResponse}


class AbuseProtectionAnswer(BaseModel):
    """The body of an answered ``OPTIONS /eventgrid``; the handshake itself is in the headers."""

    allowed_methods: list[str] = Field(default_factory=lambda: ["POST", "OPTIONS"])
    allowed_origin: str | None = Field(description="The WebHook-Allowed-Origin sent back, when one was asked.")


def default_http_get(url: str) -> int:
    import httpx

    # No redirects: a redirect could walk us off the Event Grid host we checked.
    response = httpx.get(url, timeout=30.0, follow_redirects=False)
    return response.status_code


def run_validation_get(http_get: HttpGet, url: str) -> None:
    try:
        result = http_get(url)
        log.info("eventgrid: validation GET %s -> %s", urlsplit(url).hostname, result)
    except Exception as error:  # background task: log, never crash the server
        log.error("eventgrid: validation GET to %s failed: %s", urlsplit(url).hostname, error)


def _refused(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


@dataclass(frozen=True)
class EventGridWebhook:
    """The two routes' handlers over one core processor."""

    settings: EventGridSettings
    processor: EventGridProcessor
    http_get: HttpGet

    def authorised(self, request: Request) -> bool:
        return delivery_authorised(self.settings, request.query_params.get("key"), request.headers.get(KEY_HEADER))

    @staticmethod
    def unauthorised() -> JSONResponse:
        return _refused(401, f"missing or wrong Event Grid key: put the shared secret in ?key= or {KEY_HEADER}")

    async def handshake(self, request: Request, background: BackgroundTasks) -> Response:
        if not self.authorised(request):
            return self.unauthorised()
        allow = {"Allow": "POST, OPTIONS"}
        origin = request.headers.get("WebHook-Request-Origin")
        if not origin:
            return JSONResponse(AbuseProtectionAnswer(allowed_origin=None).model_dump(), headers=allow)
        if origin.lower() not in {o.lower() for o in self.settings.allowed_origins}:
            allowed = ", ".join(self.settings.allowed_origins)
            return _refused(403, f"origin {origin[:100]!r} may not deliver here; allowed: {allowed}")
        headers = {"WebHook-Allowed-Origin": origin, **allow}
        if request.headers.get("WebHook-Request-Rate"):
            headers["WebHook-Allowed-Rate"] = "*"
        callback = request.headers.get("WebHook-Request-Callback")
        if callback:
            if not is_event_grid_url(callback, self.settings):
                return _refused(403, "WebHook-Request-Callback must be an https URL on an Event Grid host")
            background.add_task(run_in_threadpool, run_validation_get, self.http_get, callback)
        return JSONResponse(AbuseProtectionAnswer(allowed_origin=origin).model_dump(), headers=headers)

    async def _bounded_body(self, request: Request) -> bytes | JSONResponse:
        limit = self.settings.max_body_bytes
        too_large = f"the delivery is larger than {limit} bytes (COLSTREAM_EVENTGRID__MAX_BODY_BYTES)"
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return _refused(413, too_large)
        raw = await request.body()
        return _refused(413, too_large) if len(raw) > limit else raw

    async def deliver(self, request: Request, background: BackgroundTasks) -> Response:
        if not self.authorised(request):
            return self.unauthorised()
        raw = await self._bounded_body(request)
        if isinstance(raw, JSONResponse):
            return raw
        try:
            events = parse_delivery(json.loads(raw))
        except (ValueError, DeliveryError) as error:
            return _refused(400, f"not an Event Grid delivery: {error}")
        try:
            outcome = await run_in_threadpool(self.processor.process, events)
        except Exception as error:
            log.exception("eventgrid: publishing failed; Event Grid will retry")
            return _refused(503, f"publish failed: {type(error).__name__}; Event Grid retries the delivery")
        if outcome.validation_response is not None:
            return JSONResponse({"validationResponse": outcome.validation_response})
        if outcome.validation_url is not None:
            background.add_task(run_in_threadpool, run_validation_get, self.http_get, outcome.validation_url)
        return JSONResponse(
            {
                "uploads": outcome.uploads,
                "deletes": outcome.deletes,
                "skipped": [{"id": event_id, "reason": reason} for event_id, reason in outcome.skipped],
            }
        )


_DELIVERY_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"description": "An Event Grid delivery (array or CloudEvent)."}}},
    }
}


def build_eventgrid_router(
    settings: ColstreamSettings, publisher: Publisher, http_get: HttpGet | None = None
) -> APIRouter:
    """FastAPI router with ``POST /eventgrid`` and ``OPTIONS /eventgrid``.

    Raises :class:`~colstream.producers.eventgrid.EventGridNotSecured` when no secret is
    configured and unauthenticated deliveries were not allowed explicitly."""
    check_secured(settings.eventgrid)
    if settings.eventgrid.shared_secret is None:
        log.warning("eventgrid: the webhook accepts unauthenticated deliveries (allow_unauthenticated=true)")
    processor = EventGridProcessor(settings.eventgrid, settings.blob, publisher)
    webhook = EventGridWebhook(settings.eventgrid, processor, http_get or default_http_get)
    router = APIRouter(tags=["eventgrid"])
    # Tests and operators can reach the core (e.g. to inspect state).
    router.eventgrid_processor = webhook.processor  # type: ignore[attr-defined]
    router.options(
        "/eventgrid",
        response_model=AbuseProtectionAnswer,
        responses={401: _DOCUMENTED_ERROR, 403: _DOCUMENTED_ERROR},
        summary="CloudEvents abuse-protection handshake",
    )(webhook.handshake)
    router.post(
        "/eventgrid",
        responses={code: _DOCUMENTED_ERROR for code in (400, 401, 413, 503)},
        summary="Event Grid deliveries (Event Grid schema or CloudEvents 1.0)",
        openapi_extra=_DELIVERY_BODY,
    )(webhook.deliver)
    return router
