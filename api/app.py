"""The REST API: producers and read models around the Kafka pipeline.

Writes never touch Qdrant: ``/ingest/*`` stores the upload in blob storage and
publishes an :class:`UploadEvent`; ``DELETE /document/{id}`` publishes a
tombstone. The offset Kafka assigns is the document's version, and a request
that asks to wait watches the sink's per-document record until it reaches that
version. Reads (``/documents``, ``/stats``, ``/search``) come from the vector
store; ``/embed*`` runs the model in this process, loaded on first use.

Run it with ``uvicorn --factory colstream.api.app:app_from_env`` or through the CLI.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from colstream.api.auth import Authenticator, KeyRing, Principal, tenant_metadata
from colstream.api.console import build_console_router
from colstream.api.content import (
    RejectedInput,
    blob_safe_name,
    check_image_file,
    check_pdf_file,
    clean_filename,
)
from colstream.api.contract import install_error_contract
from colstream.api.failures import public_reason, scrub_paths
from colstream.api.guards import RejectControlCharactersInPath
from colstream.api.images import EmbedImageDecoder, LimitBodyPerPath, embed_body_limits
from colstream.api.lazy import Lazy, LazyProxy
from colstream.api.limits import LimitRequestBody
from colstream.api.models import (
    AcceptedResponse,
    DeleteResponse,
    DocumentDetail,
    DocumentSummary,
    EmbedBatchRequest,
    EmbedBatchResponse,
    EmbedQueryRequest,
    EmbedRequest,
    EmbedResponse,
    ErrorResponse,
    HealthResponse,
    IngestResponse,
    PooledEmbedResponse,
    StatsResponse,
)
from colstream.api.progress import (
    UploadKind,
    delete_applied,
    detail,
    ingest_outcome,
    summary,
    upload_finished,
)
from colstream.api.protocols import BlobWriterLike, EmbedderLike, PublisherLike, RecordStoreLike, model_label
from colstream.api.publishing import PublishOutcomeUnknown, publish_http_error
from colstream.api.search import build_search_router
from colstream.api.tenancy import check_tenant_index, parse_metadata_field, visible, visible_records
from colstream.infra.blob_names import upload_blob_name
from colstream.infra.health import BackgroundChecks
from colstream.infra.settings import ColstreamSettings, ModelSettings
from colstream.schemas.events import DocumentRecord, UploadEvent, _check_document_id, utcnow
from colstream.schemas.ids import DOCUMENT_ID_MAX_LENGTH, DOCUMENT_ID_PATTERN, DOCUMENT_ID_RULE

log = logging.getLogger(__name__)

DEFAULT_INGEST_TIMEOUT_S = 120.0
DEFAULT_DELETE_TIMEOUT_S = 60.0
MAX_WAIT_S = 3600.0
SPOOL_CHUNK_BYTES = 1024 * 1024

T = TypeVar("T")

ModelLoader = Callable[[ModelSettings], EmbedderLike]
Require = Callable[[Any], Any]
StageStats = Callable[[], dict[str, Any]]
KafkaProbe = Callable[[], bool]


# ----------------------------------------------------------------------------- context


@dataclass(frozen=True)
class ServingIndex:
    """The index reads come from and the model that embeds queries for it: one pair, so a
    search embeds and searches with the same model even while a migration switches them."""

    store: Lazy[RecordStoreLike]
    model: Lazy[EmbedderLike]


@dataclass
class ApiContext:
    settings: ColstreamSettings
    serving: ServingIndex
    publisher: Lazy[PublisherLike]
    blob_store: Lazy[BlobWriterLike]
    stage_stats: StageStats | None
    kafka_probe: KafkaProbe
    poll_interval_s: float
    # One inference at a time: concurrent forwards only fight over the same cores / GPU memory.
    # A thread lock, taken inside the worker thread, works whatever event loop serves the request.
    model_lock: threading.Lock
    model_loader: ModelLoader | None = None

    @property
    def store(self) -> Lazy[RecordStoreLike]:
        return self.serving.store

    @property
    def model(self) -> Lazy[EmbedderLike]:
        return self.serving.model

    def switch_serving(self, store: RecordStoreLike, model_settings: ModelSettings) -> None:
        """Serve ``store`` with the model ``model_settings`` load (a migration's cutover): the
        model is loaded first, then both are swapped in one assignment. Searches under way
        finish on the pair they started with."""
        loader = self.model_loader or _default_model_loader
        model: Lazy[EmbedderLike] = Lazy(lambda: loader(model_settings))
        model.get()
        self.serving = ServingIndex(store=Lazy(lambda: store, given=store), model=model)

    async def run_model(self, call: Callable[..., T], *args: Any) -> T:
        def locked() -> T:
            with self.model_lock:
                return call(*args)

        return await run_in_threadpool(locked)

    async def call_store(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            store = await run_in_threadpool(self.store.get)
            return await run_in_threadpool(getattr(store, method), *args, **kwargs)
        except HTTPException:
            raise
        except Exception as exc:
            log.exception("vector store %s failed", method)
            raise HTTPException(503, f"vector store unavailable: {public_reason(exc)}") from exc

    async def read_record(self, document_id: str) -> DocumentRecord | None:
        records: dict[str, DocumentRecord] = await self.call_store("get_records", [document_id])
        return records.get(document_id)

    async def get_model(self, serving: ServingIndex | None = None) -> EmbedderLike:
        try:
            return await run_in_threadpool((serving or self.serving).model.get)
        except Exception as exc:
            log.exception("model load failed")
            raise HTTPException(503, f"embedding model unavailable: {public_reason(exc)}") from exc

    async def publish(self, action: Callable[[PublisherLike], Any]) -> Any:
        try:
            publisher = await run_in_threadpool(self.publisher.get)
            return await run_in_threadpool(action, publisher)
        except Exception as exc:
            log.exception("publishing to Kafka failed")
            raise publish_http_error(exc) from exc

    async def wait_for(
        self, document_id: str, done: Callable[[DocumentRecord | None], bool], timeout_s: float
    ) -> tuple[bool, DocumentRecord | None]:
        deadline = time.monotonic() + timeout_s
        while True:
            record = await self.read_record(document_id)
            if done(record):
                return True, record
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False, record
            await asyncio.sleep(min(self.poll_interval_s, remaining))


def _default_store(settings: ColstreamSettings) -> RecordStoreLike:
    from colstream.infra.vectorstore import open_vector_store

    return open_vector_store(settings.qdrant)


def _default_publisher(settings: ColstreamSettings) -> PublisherLike:
    from colstream.producers.publisher import UploadPublisher

    return UploadPublisher(settings)


def _default_blob_store(settings: ColstreamSettings) -> BlobWriterLike:
    from colstream.infra.blobstore import open_blob_store

    return open_blob_store(settings)


def _serving_model_settings(settings: ColstreamSettings, store: Lazy[RecordStoreLike]) -> ModelSettings:
    """The model that embeds queries: the one the index was built with, when it records one."""
    from colstream.embedding.profile import model_settings_for_index

    index_model = getattr(store.get(), "index_model", None)
    return model_settings_for_index(settings.model, index_model() if callable(index_model) else None)


def _default_model_loader(model_settings: ModelSettings) -> EmbedderLike:
    from colstream.embedding.model import load_model

    return load_model(model_settings)


def _default_kafka_probe(publisher: Lazy[PublisherLike]) -> KafkaProbe:
    def probe() -> bool:
        try:
            instance: Any = publisher.get()
            ping = getattr(instance, "ping", None)
            if callable(ping):
                return bool(ping())
            # UploadPublisher -> ProducerClient -> confluent Producer: a metadata round trip.
            instance.producer.producer.list_topics(timeout=2.0)
            return True
        except Exception:
            return False

    return probe


# ----------------------------------------------------------------------------- app


def create_app(
    settings: ColstreamSettings,
    *,
    store: RecordStoreLike | None = None,
    publisher: PublisherLike | None = None,
    model_loader: ModelLoader | None = None,
    stage_stats: StageStats | None = None,
    blob_store: BlobWriterLike | None = None,
    kafka_probe: KafkaProbe | None = None,
    poll_interval_s: float = 0.25,
    mount_eventgrid: bool = True,
    gpu_probe: Callable[[], bool] | None = None,
    migrations: Any = None,
) -> FastAPI:
    """Build the API. Every dependency not passed in is opened from ``settings`` on first use.

    Refuses bad key configuration here, before anything is served (KeyConfigError)."""
    authenticator = Authenticator(KeyRing.from_settings(settings.api))
    check_tenant_index(settings)
    require: Require = authenticator.require
    loader = model_loader or _default_model_loader
    publisher_lazy: Lazy[PublisherLike] = Lazy(lambda: _default_publisher(settings), given=publisher)
    store_lazy: Lazy[RecordStoreLike] = Lazy(lambda: _default_store(settings), given=store)
    model_lazy: Lazy[EmbedderLike] = Lazy(lambda: loader(_serving_model_settings(settings, store_lazy)))
    ctx = ApiContext(
        settings=settings,
        serving=ServingIndex(store=store_lazy, model=model_lazy),
        publisher=publisher_lazy,
        blob_store=Lazy(lambda: _default_blob_store(settings), given=blob_store),
        stage_stats=stage_stats,
        kafka_probe=kafka_probe or _default_kafka_probe(publisher_lazy),
        poll_interval_s=poll_interval_s,
        model_lock=threading.Lock(),
        model_loader=loader,
    )

    # An API on a Qdrant server that runs no migration itself (a replica on a cluster)
    # follows the alias that a cutover Job moves.
    follow_alias = migrations is None and store is None and bool(settings.qdrant.url)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        from colstream.api.following import AliasFollower

        follower = AliasFollower(ctx, settings).start() if follow_alias else None
        yield
        if follower is not None:
            follower.stop()
        for holder in (ctx.publisher, ctx.store, ctx.blob_store, ctx.model):
            try:
                holder.close()
            except Exception:
                log.exception("closing %s failed", holder)

    app = FastAPI(
        title="colstream",
        version="0.1.0",
        description=(
            "Document embedding API on a Kafka pipeline: uploads and deletes are published to "
            f"`{settings.topics.uploads}`; reads come from the sink's records in Qdrant."
        ),
        lifespan=lifespan,
    )
    app.state.colstream = ctx
    app.add_middleware(LimitRequestBody, max_bytes=settings.api.max_upload_bytes)
    # The JSON routes that carry images get a tighter bound, checked before parsing.
    app.add_middleware(LimitBodyPerPath, limits=embed_body_limits(settings.limits))
    app.add_middleware(RejectControlCharactersInPath)
    install_error_contract(app)

    @app.exception_handler(RejectedInput)
    async def _rejected(_: Request, exc: RejectedInput) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"detail": exc.message})

    app.include_router(_health_router(ctx, gpu_probe or _cuda_available, authenticator))
    # Before the documents router: /documents/{id}/pages/{n}/image is more specific than /documents/{id}.
    app.include_router(build_console_router(ctx, require))
    app.include_router(_documents_router(ctx, require))
    app.include_router(_ingest_router(ctx, require))
    app.include_router(_embedding_router(ctx, require))
    app.include_router(build_search_router(ctx, require))
    if mount_eventgrid:
        _mount_eventgrid(app, settings, ctx)
    if migrations is not None:
        # `run all`'s migrations (admin scope): the commands of `colstream migrate`.
        from colstream.api.migration import build_migration_router

        app.include_router(build_migration_router(migrations, require))
        migrations.attach_api(ctx.switch_serving)
    return app


def app_from_env() -> FastAPI:
    from colstream.infra.settings import get_settings

    return create_app(get_settings())


def _mount_eventgrid(app: FastAPI, settings: ColstreamSettings, ctx: ApiContext) -> None:
    from colstream.api.eventgrid import build_eventgrid_router
    from colstream.producers.eventgrid import EventGridNotSecured

    try:
        router = build_eventgrid_router(settings, LazyProxy(ctx.publisher))
    except EventGridNotSecured as exc:
        # Refused, not mounted open: an unauthenticated /eventgrid lets anyone delete documents.
        log.warning("/eventgrid not mounted: %s", exc)
        return
    app.include_router(router)


def _document_id_param(location: Any, **extra: Any) -> Any:
    """A document id parameter whose schema carries the id rule (checked again by ``_validated_document_id``)."""
    return location(
        pattern=DOCUMENT_ID_PATTERN, min_length=1, max_length=DOCUMENT_ID_MAX_LENGTH, description=DOCUMENT_ID_RULE,
        **extra,
    )


def _validated_document_id(document_id: str) -> str:
    try:
        return _check_document_id(document_id)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 409, 413, 415, 422, 503, 504)
}


# ----------------------------------------------------------------------------- health


_gpu: list[bool] = []


def _cuda_available() -> bool:
    """Whether torch sees a CUDA device; asked once per process (importing torch takes seconds)."""
    if not _gpu:
        try:
            import torch

            _gpu.append(bool(torch.cuda.is_available()))
        except Exception:
            _gpu.append(False)
    return _gpu[0]


def _health_router(ctx: ApiContext, gpu_probe: Callable[[], bool], authenticator: Authenticator) -> APIRouter:
    router = APIRouter(tags=["health"])

    def qdrant_reachable() -> bool:
        try:
            ctx.store.get().count_pages()
            return True
        except Exception:
            return False

    # Kafka and Qdrant are checked in background threads; /health waits for them at most
    # 0.8 s and otherwise reports the last result with its age, so it answers within 1 s
    # even when either of them hangs.
    checks = BackgroundChecks({"kafka": ctx.kafka_probe, "qdrant": qdrant_reachable}, ctx.settings.health)

    @router.get("/health", response_model=HealthResponse)
    async def health(request: Request) -> HealthResponse:
        results = await run_in_threadpool(checks.refresh, 0.8)
        kafka_ok, qdrant_ok = bool(results["kafka"].ok), bool(results["qdrant"].ok)
        gpu = await run_in_threadpool(gpu_probe)
        model = ctx.model.peek()
        # Open for probes; the stages' counters and errors only for a valid key.
        insider = authenticator.optional(request) is not None
        stages = await run_in_threadpool(ctx.stage_stats) if ctx.stage_stats and insider else None
        return HealthResponse(
            status="healthy" if kafka_ok and qdrant_ok else "degraded",
            kafka_connected=kafka_ok,
            qdrant_connected=qdrant_ok,
            model_loaded=model is not None,
            gpu_available=gpu,
            # Until the model loads this is what was asked for ("auto" included).
            device=str(model.device) if model is not None else ctx.settings.model.device,
            model=model_label(model) if model is not None else None,
            stages=stages,
            checks=checks.report(),
        )

    return router


# ----------------------------------------------------------------------------- documents


def _documents_router(ctx: ApiContext, require: Require) -> APIRouter:
    router = APIRouter(tags=["documents"], responses=_ERRORS)

    @router.get("/documents", response_model=list[DocumentSummary])
    async def list_documents(principal: Principal = Depends(require("read"))) -> list[DocumentSummary]:
        records: list[DocumentRecord] = await ctx.call_store("list_records")
        live = [record for record in visible_records(principal, records) if record.state != "deleted"]
        return [summary(record) for record in sorted(live, key=lambda r: r.document_id)]

    # `:path` because document ids may contain '/' (e.g. "{container}/{blob}" from Event Grid).
    @router.get("/documents/{document_id:path}", response_model=DocumentDetail)
    async def get_document(
        document_id: str = _document_id_param(PathParam), principal: Principal = Depends(require("read"))
    ) -> DocumentDetail:
        # Another tenant's document answers exactly as a missing one does.
        record = visible(principal, await ctx.read_record(document_id))
        if record is None:
            raise HTTPException(404, f"document {document_id!r} not found")
        if record.state == "deleted":
            raise HTTPException(404, f"document {document_id!r} was deleted (version {record.version})")
        return detail(record)

    @router.delete(
        "/document/{document_id:path}",
        response_model=DeleteResponse,
        responses={202: {"model": DeleteResponse}},
    )
    async def delete_document(
        document_id: str = _document_id_param(PathParam),
        wait: bool = Query(False, description="Wait until the sink has removed the pages."),
        timeout_s: float = Query(DEFAULT_DELETE_TIMEOUT_S, ge=0, le=MAX_WAIT_S),
        principal: Principal = Depends(require("delete")),
    ) -> JSONResponse:
        document_id = _validated_document_id(document_id)
        current = visible(principal, await ctx.read_record(document_id))
        if current is None or current.state == "deleted":
            # Never seen (or already gone): a tombstone would only grow the records.
            raise HTTPException(404, f"document {document_id!r} not found")
        published = await ctx.publish(lambda publisher: publisher.publish_delete(document_id))
        version: int | None = getattr(published, "offset", None)
        applied = False
        if wait:
            applied, _ = await ctx.wait_for(document_id, lambda record: delete_applied(record, version), timeout_s)
        body = DeleteResponse(
            message=f"Document {document_id} deleted successfully",
            status="deleted" if applied else "accepted",
            document_id=document_id,
            version=version,
        )
        if wait and not applied:
            body.message = f"Delete of document {document_id} accepted; not applied within {timeout_s:g}s"
        return JSONResponse(status_code=200 if applied else 202, content=body.model_dump(mode="json"))

    @router.get("/stats", response_model=StatsResponse)
    async def stats(principal: Principal = Depends(require("read"))) -> StatsResponse:
        raw: dict[str, Any] = await ctx.call_store("stats")
        total = raw.get("total_vectors")
        if principal.tenant is not None:
            total = await ctx.call_store("count_pages", filter={"tenant": principal.tenant})
        return StatsResponse(
            collection_name=raw.get("collection_name") or ctx.settings.qdrant.collection,
            total_vectors=int(total or 0),
            vector_dimension=raw.get("vector_dimension"),
            distance_metric=str(raw.get("distance_metric") or "COSINE"),
            backend=raw.get("backend"),
        )

    return router


# ----------------------------------------------------------------------------- ingest


async def _spool_upload(upload: UploadFile, max_bytes: int, directory: Path | None) -> Path:
    """Copy the request body to a temp file, refusing it as soon as it passes the limit."""
    fd, name = tempfile.mkstemp(prefix="colstream-upload-", dir=directory)
    path = Path(name)
    size = 0
    try:
        with os.fdopen(fd, "wb") as sink:
            while chunk := await upload.read(SPOOL_CHUNK_BYTES):
                size += len(chunk)
                if size > max_bytes:
                    raise RejectedInput(413, f"upload is larger than the {max_bytes}-byte limit")
                sink.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _ingest_router(ctx: ApiContext, require: Require) -> APIRouter:
    router = APIRouter(tags=["ingest"], responses=_ERRORS)
    limits = ctx.settings.limits

    async def ingest(
        kind: UploadKind,
        upload: UploadFile,
        document_id: str | None,
        wait: bool,
        timeout_s: float,
        principal: Principal,
        metadata_field: str | None,
    ) -> JSONResponse:
        document_id = _validated_document_id(document_id) if document_id else str(uuid.uuid4())
        metadata = tenant_metadata(principal, parse_metadata_field(metadata_field))
        if principal.tenant is not None:
            existing = await ctx.read_record(document_id)
            if existing is not None and existing.state != "deleted" and visible(principal, existing) is None:
                # Never replace another tenant's document.
                raise HTTPException(
                    409, f"document_id {document_id!r} is not available to this API key; choose another"
                )
        fallback = "upload.pdf" if kind == "pdf" else "upload.img"
        filename = clean_filename(upload.filename, fallback)

        spooled = await _spool_upload(upload, limits.max_blob_bytes, ctx.settings.blob.download_dir)
        try:
            if kind == "pdf":
                content_type = await run_in_threadpool(check_pdf_file, spooled)
            else:
                content_type = await run_in_threadpool(check_image_file, spooled, limits.max_image_pixels)
            # A fresh name per upload keeps every version's blob immutable: an older
            # version still in the pipeline never reads a newer upload's bytes.
            # Every component fits any file system, whatever the id (infra/blob_names.py).
            blob_name = upload_blob_name(document_id, blob_safe_name(filename, fallback))
            try:
                blobs = await run_in_threadpool(ctx.blob_store.get)
                blob_uri = await run_in_threadpool(blobs.put_file, spooled, blob_name, content_type)
            except Exception as exc:
                raise _blob_http_error(exc) from exc
        finally:
            spooled.unlink(missing_ok=True)

        try:
            event = UploadEvent(
                document_id=document_id,
                blob_uri=blob_uri,
                filename=filename,
                content_type=content_type,
                metadata=metadata,
            )
        except ValidationError as exc:
            raise HTTPException(422, str(exc)) from exc
        published_at = utcnow()
        try:
            published = await ctx.publish(lambda publisher: publisher.publish_upload(event))
        except PublishOutcomeUnknown:
            # The record may still be written from the producer's queue: its blob must stay.
            raise
        except HTTPException:
            await run_in_threadpool(_forget_blob, ctx, blob_uri)
            raise
        version: int | None = getattr(published, "offset", None)

        if not wait:
            accepted = AcceptedResponse(document_id=document_id, version=version, filename=filename)
            return JSONResponse(status_code=202, content=accepted.model_dump(mode="json"))
        finished, record = await ctx.wait_for(
            document_id, lambda rec: upload_finished(rec, version, published_at), timeout_s
        )
        if not finished or record is None:
            reached_version = record is not None and (version is None or record.version >= version)
            current = record.state if record is not None and reached_version else None
            accepted = AcceptedResponse(
                document_id=document_id,
                version=version,
                filename=filename,
                state=current,
                message=(
                    f"still processing after {timeout_s:g}s; poll GET /documents/{document_id} "
                    f"until its version is >= {version} and its state is settled"
                ),
            )
            return JSONResponse(status_code=202, content=accepted.model_dump(mode="json"))
        status, body = ingest_outcome(record, version, kind, filename)
        return JSONResponse(status_code=status, content=body.model_dump(mode="json"))

    wait_query = Query(True, description="Wait until the pipeline has indexed (or failed) the document.")
    timeout_query = Query(DEFAULT_INGEST_TIMEOUT_S, ge=0, le=MAX_WAIT_S)
    document_id_form = _document_id_param(Form, default=None)
    metadata_form = Form(
        None,
        description=(
            'A JSON object stored with every page, e.g. {"tenant": "acme", "year": 2026}; values are strings, '
            "numbers, booleans or lists of strings. A tenant-bound key sets metadata.tenant itself."
        ),
    )
    ingest_responses: dict[int | str, dict[str, Any]] = {202: {"model": AcceptedResponse}}

    @router.post("/ingest/pdf", response_model=IngestResponse, responses=ingest_responses)
    async def ingest_pdf(
        file: UploadFile = File(..., description="A PDF file."),
        document_id: str | None = document_id_form,
        metadata: str | None = metadata_form,
        wait: bool = wait_query,
        timeout_s: float = timeout_query,
        principal: Principal = Depends(require("write")),
    ) -> JSONResponse:
        return await ingest("pdf", file, document_id, wait, timeout_s, principal, metadata)

    @router.post("/ingest/image", response_model=IngestResponse, responses=ingest_responses)
    async def ingest_image(
        file: UploadFile = File(..., description="PNG, JPEG, BMP, TIFF, WEBP or GIF."),
        document_id: str | None = document_id_form,
        metadata: str | None = metadata_form,
        wait: bool = wait_query,
        timeout_s: float = timeout_query,
        principal: Principal = Depends(require("write")),
    ) -> JSONResponse:
        return await ingest("image", file, document_id, wait, timeout_s, principal, metadata)

    return router


def _blob_http_error(exc: Exception) -> HTTPException:
    error_type = getattr(exc, "error_type", None)
    if error_type == "BlobNotAllowed":
        return HTTPException(400, f"cannot store the upload: {scrub_paths(str(exc))}")
    if error_type == "BlobTooLarge":
        return HTTPException(413, f"cannot store the upload: {scrub_paths(str(exc))}")
    log.exception("storing an upload failed")
    return HTTPException(503, f"blob storage unavailable: {public_reason(exc)}")


def _forget_blob(ctx: ApiContext, uri: str) -> None:
    # Nothing will ever reference a blob whose event was not published.
    try:
        ctx.blob_store.get().delete(uri)
    except Exception:
        log.warning("could not remove orphaned upload %s", uri, exc_info=True)


# ----------------------------------------------------------------------------- embeddings


def _real_token_rows(vectors: np.ndarray) -> np.ndarray:
    # The model already drops padding; a non-finite row could still not be sent as JSON.
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array.reshape(1, -1)
    return array[np.isfinite(array).all(axis=1)]


def _embedding_router(ctx: ApiContext, require: Require) -> APIRouter:
    router = APIRouter(tags=["embeddings"], responses=_ERRORS, dependencies=[Depends(require("read"))])
    limits = ctx.settings.limits

    async def embed_images(images: list[Any]) -> tuple[EmbedderLike, list[np.ndarray]]:
        model = await ctx.get_model()
        vectors = await ctx.run_model(model.embed_images, images)
        return model, [_real_token_rows(v) for v in vectors]

    # Header checks, a per-request pixel budget, bounded concurrent decodes, downscaled decoding.
    decoder = EmbedImageDecoder(limits)

    def decode(data: str, what: str) -> Any:
        return decoder.decode(data, what)

    @router.post("/embed", response_model=EmbedResponse | PooledEmbedResponse)
    async def embed(
        request: EmbedRequest,
        pooled: bool = Query(False, description="Return the mean of the token vectors: one flat vector (seed shape)."),
    ) -> EmbedResponse | PooledEmbedResponse:
        image = await run_in_threadpool(decode, request.image, "image")
        model, (vectors,) = await embed_images([image])
        if pooled:
            dim = int(vectors.shape[1]) if vectors.size else model.dim
            mean = vectors.mean(axis=0) if vectors.shape[0] else np.zeros(dim, dtype=np.float32)
            return PooledEmbedResponse(
                embedding=mean.tolist(), dim=dim, num_tokens=int(vectors.shape[0]), model=model_label(model)
            )
        return EmbedResponse(
            embedding=vectors.tolist(),
            dim=int(vectors.shape[1]) if vectors.size else model.dim,
            num_tokens=int(vectors.shape[0]),
            model=model_label(model),
        )

    @router.post("/embed_batch", response_model=EmbedBatchResponse)
    async def embed_batch(request: EmbedBatchRequest) -> EmbedBatchResponse:
        images = await run_in_threadpool(
            decoder.decode_all, [(data, f"images[{index}]") for index, data in enumerate(request.images)]
        )
        model, vectors = await embed_images(images)
        return EmbedBatchResponse(
            embeddings=[v.tolist() for v in vectors],
            count=len(vectors),
            dim=model.dim,
            num_tokens=[int(v.shape[0]) for v in vectors],
            model=model_label(model),
        )

    async def embed_query(text: str) -> tuple[EmbedderLike, np.ndarray]:
        if not text.strip():
            raise HTTPException(400, "query text is empty")
        model = await ctx.get_model()
        (vectors,) = await ctx.run_model(model.embed_queries, [text])
        return model, _real_token_rows(vectors)

    @router.post("/embed/query", response_model=EmbedResponse)
    async def embed_query_route(request: EmbedQueryRequest) -> EmbedResponse:
        model, vectors = await embed_query(request.text)
        return EmbedResponse(
            embedding=vectors.tolist(),
            dim=int(vectors.shape[1]) if vectors.size else model.dim,
            num_tokens=int(vectors.shape[0]),
            model=model_label(model),
        )

    return router
