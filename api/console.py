"""The web console at ``/``: search with page thumbnails, documents, uploads, dead letters.

The HTML shell and its static assets (``api/static``, no build step) are public:
they hold no data. Everything they show comes from authenticated calls made by
the page with the API key the user typed once (kept in the tab's session
storage): the REST routes everyone uses, plus the few routes here:

* ``GET /console/session`` (read): who the key is, the model, whether it has
  random weights, the metadata keys a search may filter on;
* ``GET /console/events`` (read): Server-Sent Events with the sink's
  per-document records as they change (progress, completion, failure);
* ``GET /dead-letters`` and ``POST /dead-letters/redrive`` (admin).

The event stream reads the same records that the sink writes before it
announces a version on the indexed topic, so it shows progress page by page and
every settled state; a tenant-bound key sees its own tenant's documents only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from colstream.api.auth import Principal
from colstream.api.page_images import PageImages, build_page_image_router
from colstream.api.progress import summary
from colstream.api.protocols import model_label
from colstream.infra.dead_letters import RedriveOutcome, Selection
from colstream.infra.settings import ApiScope, ColstreamSettings
from colstream.schemas import DeadLetter
from colstream.schemas.events import DocumentRecord

if TYPE_CHECKING:
    from colstream.api.app import ApiContext

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
ASSETS: dict[str, str] = {
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# Event streams: how often records are read, how long one stream lives before the
# browser reconnects, and how many may be open at once (each polls the store).
EVENTS_POLL_S = 0.5
EVENTS_HEARTBEAT_S = 15.0
EVENTS_MAX_AGE_S = 600.0
MAX_EVENT_STREAMS = 32
MAX_DEAD_LETTERS = 1000
MAX_REDRIVE = 100

ScopeRequirement = Callable[[ApiScope], Callable[..., Awaitable[Principal]]]


# ----------------------------------------------------------------------------- models


class ConsoleSession(BaseModel):
    authenticated: bool = Field(description="False when the API runs without keys (loopback only).")
    scopes: list[str]
    tenant: str | None
    model: str | None = Field(description="The loaded model, or the configured one before the first query.")
    random_weights: bool = Field(description="Vectors come from random weights: results carry no meaning.")
    indexed_metadata: list[str] = Field(description="Metadata keys a search may filter on.")
    page_image_max_width: int


class DeadLetterRow(BaseModel):
    dlq_offset: str = Field(description="PARTITION:OFFSET on the dead-letter topic.")
    stage: str
    error_type: str
    message: str
    document_id: str | None
    version: int | None
    page_number: int | None
    failed_at: datetime
    source_topic: str
    source_partition: int | None
    source_offset: int | None
    original_key: str | None


class DeadLetterList(BaseModel):
    dead_letters: list[DeadLetterRow]
    limit: int


class RedriveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    offsets: list[str] = Field(
        min_length=1, max_length=MAX_REDRIVE, description="PARTITION:OFFSET of each dead letter to redrive."
    )
    force: bool = Field(False, description="Redrive even when the document already has a newer version.")


class RedriveRow(BaseModel):
    dlq_offset: str
    action: str
    reason: str | None
    source_topic: str
    document_id: str | None


class RedriveResponse(BaseModel):
    outcomes: list[RedriveRow]
    redriven: int


def _dead_letter_row(where: str, letter: DeadLetter) -> DeadLetterRow:
    return DeadLetterRow(
        dlq_offset=where,
        stage=letter.stage,
        error_type=letter.error_type,
        message=letter.message,
        document_id=letter.document_id,
        version=letter.version,
        page_number=letter.page_number,
        failed_at=letter.failed_at,
        source_topic=letter.source_topic,
        source_partition=letter.source_partition,
        source_offset=letter.source_offset,
        original_key=letter.original_key,
    )


# ----------------------------------------------------------------------------- dead letters


class DeadLetterSource(Protocol):
    def newest(self, selection: Selection, last_per_partition: int) -> list[tuple[str, DeadLetter]]: ...

    def at(self, offsets: Sequence[str]) -> list[tuple[str, DeadLetter]]: ...

    def redrive(self, letters: Sequence[tuple[str, DeadLetter]],
                current_versions: Mapping[str, int]) -> list[RedriveOutcome]: ...


@dataclass
class KafkaDeadLetters:
    """The dead-letter topic, read and redriven exactly as ``colstream dlq`` does."""

    settings: ColstreamSettings

    def newest(self, selection: Selection, last_per_partition: int) -> list[tuple[str, DeadLetter]]:
        from colstream.infra.dead_letters import dead_letters

        return dead_letters(self.settings, selection, last_per_partition=last_per_partition)

    def at(self, offsets: Sequence[str]) -> list[tuple[str, DeadLetter]]:
        from colstream.infra.dead_letters import letters_at

        return letters_at(self.settings, offsets)

    def redrive(self, letters: Sequence[tuple[str, DeadLetter]],
                current_versions: Mapping[str, int]) -> list[RedriveOutcome]:
        from colstream.infra.dead_letters import redrive

        return redrive(self.settings, letters, current_versions)


# ----------------------------------------------------------------------------- router


def _document_row(record: DocumentRecord) -> dict[str, Any]:
    row: dict[str, Any] = summary(record).model_dump(mode="json")
    row["error"] = record.error
    row["metadata"] = record.metadata
    return row


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class _StreamSlots:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    def take(self) -> None:
        if self.open >= self.limit:
            raise HTTPException(503, f"{self.limit} event streams are open; close a console tab or retry later",
                                headers={"Retry-After": "5"})
        self.open += 1

    def give(self) -> None:
        self.open -= 1


def _asset(name: str) -> tuple[bytes, str]:
    data = (STATIC_DIR / name).read_bytes()
    return data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


def build_console_router(
    ctx: ApiContext,
    require: ScopeRequirement,
    *,
    page_images: PageImages | None = None,
    dead_letter_source: DeadLetterSource | None = None,
) -> APIRouter:
    """The console and the routes it needs; ``require(scope)`` is the API's auth dependency.

    Include it before the documents router: its page-image route is more specific
    than ``/documents/{document_id:path}``."""
    settings = ctx.settings
    router = APIRouter()
    images = page_images or PageImages(settings, ctx.blob_store.get)
    router.include_router(build_page_image_router(settings, ctx.read_record, images, require("read")))
    letters_source: DeadLetterSource = dead_letter_source or KafkaDeadLetters(settings)
    slots = _StreamSlots(MAX_EVENT_STREAMS)
    auth_required = bool(settings.api.keys) or settings.api.keys_file is not None

    # -- the public shell ---------------------------------------------------------------
    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def console_page() -> HTMLResponse:
        # Whether to ask for a key before the first call: the same fact a 401 would tell.
        page = _asset("index.html")[0].replace(b"__AUTH_REQUIRED__", b"true" if auth_required else b"false")
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @router.get("/console/assets/{name}", include_in_schema=False)
    async def console_asset(name: str, request: Request) -> Response:
        media_type = ASSETS.get(name)
        if media_type is None:
            raise HTTPException(404, f"no console asset {name!r}")
        data, etag = _asset(name)
        headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type=media_type, headers=headers)

    # -- authenticated ------------------------------------------------------------------
    @router.get("/console/session", response_model=ConsoleSession, tags=["console"])
    async def console_session(principal: Principal = Depends(require("read"))) -> ConsoleSession:
        model = ctx.model.peek()
        label: str | None
        if model is not None:
            label, random_weights = model_label(model), bool(model.is_random_weights)
        else:
            from colstream.embedding.tiny import is_random_weights_checkpoint

            configured = settings.model.name_or_path
            label = configured
            random_weights = bool(configured) and is_random_weights_checkpoint(configured or "")
        return ConsoleSession(
            authenticated=principal.authenticated,
            scopes=sorted(principal.scopes),
            tenant=principal.tenant,
            model=label,
            random_weights=random_weights,
            indexed_metadata=list(settings.qdrant.indexed_metadata),
            page_image_max_width=settings.page_images.max_width,
        )

    @router.get(
        "/console/events",
        tags=["console"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}},
                         "description": "`snapshot`, then `document` and `removed` events."}},
    )
    async def console_events(request: Request, principal: Principal = Depends(require("read"))) -> StreamingResponse:
        slots.take()

        async def stream() -> AsyncIterator[str]:
            try:
                started = last_beat = time.monotonic()
                sent: dict[str, str] = {}
                first = True
                yield "retry: 2000\n\n"
                while time.monotonic() - started < EVENTS_MAX_AGE_S:
                    if await request.is_disconnected():
                        return
                    try:
                        records: list[DocumentRecord] = await ctx.call_store("list_records")
                    except HTTPException as exc:
                        yield _sse("unavailable", {"detail": exc.detail})
                        await asyncio.sleep(2.0)
                        continue
                    rows = {
                        r.document_id: _document_row(r)
                        for r in records
                        if r.state != "deleted" and principal.sees(r.metadata)
                    }
                    encoded = {doc: json.dumps(row, sort_keys=True) for doc, row in rows.items()}
                    if first:
                        yield _sse("snapshot", sorted(rows.values(), key=lambda row: row["document_id"]))
                        first = False
                    else:
                        for doc, text in encoded.items():
                            if sent.get(doc) != text:
                                yield _sse("document", rows[doc])
                        for doc in sent.keys() - encoded.keys():
                            yield _sse("removed", {"document_id": doc})
                    sent = encoded
                    if time.monotonic() - last_beat > EVENTS_HEARTBEAT_S:
                        last_beat = time.monotonic()
                        yield ": keep-alive\n\n"
                    await asyncio.sleep(EVENTS_POLL_S)
            finally:
                slots.give()

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @router.get("/dead-letters", response_model=DeadLetterList, tags=["dead letters"])
    async def list_dead_letters(
        stage: str | None = Query(None, max_length=64),
        error_type: str | None = Query(None, max_length=128),
        document_id: str | None = Query(None, max_length=1024),
        limit: int = Query(200, ge=1, le=MAX_DEAD_LETTERS, description="Newest letters per partition."),
        _: Principal = Depends(require("admin")),
    ) -> DeadLetterList:
        selection = Selection(stage=stage, error_type=error_type, document_id=document_id)
        try:
            letters = await run_in_threadpool(letters_source.newest, selection, limit)
        except Exception as exc:
            log.exception("reading dead letters failed")
            raise HTTPException(503, f"cannot read the dead-letter topic: {type(exc).__name__}") from exc
        newest = sorted(letters, key=lambda item: item[1].failed_at, reverse=True)[:limit]
        return DeadLetterList(dead_letters=[_dead_letter_row(w, letter) for w, letter in newest], limit=limit)

    @router.post("/dead-letters/redrive", response_model=RedriveResponse, tags=["dead letters"])
    async def redrive_dead_letters(
        request: RedriveRequest, _: Principal = Depends(require("admin"))
    ) -> RedriveResponse:
        for where in request.offsets:
            partition, _sep, offset = where.partition(":")
            if not (partition.isdigit() and offset.isdigit()):
                raise HTTPException(400, f"dead letter position {where!r} is not PARTITION:OFFSET")
        try:
            letters = await run_in_threadpool(letters_source.at, request.offsets)
        except Exception as exc:
            log.exception("reading dead letters failed")
            raise HTTPException(503, f"cannot read the dead-letter topic: {type(exc).__name__}") from exc
        missing = sorted(set(request.offsets) - {where for where, _ in letters})
        if missing:
            raise HTTPException(404, f"no dead letter at {', '.join(missing)}")
        current: dict[str, int] = {}
        if not request.force:
            ids = sorted({letter.document_id for _, letter in letters if letter.document_id})
            records: dict[str, DocumentRecord] = await ctx.call_store("get_records", ids) if ids else {}
            current = {doc: record.version for doc, record in records.items()}
        try:
            outcomes = await run_in_threadpool(letters_source.redrive, letters, current)
        except Exception as exc:
            log.exception("redriving dead letters failed")
            raise HTTPException(503, f"could not publish to Kafka: {type(exc).__name__}") from exc
        rows = [
            RedriveRow(dlq_offset=o.where, action=o.action, reason=o.reason,
                       source_topic=o.letter.source_topic, document_id=o.letter.document_id)
            for o in outcomes
        ]
        return RedriveResponse(outcomes=rows, redriven=sum(1 for o in outcomes if o.action == "redriven"))

    return router
