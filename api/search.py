"""``POST /search``: a text query against the page index, with metadata filters.

The filter names ``document_id`` or metadata keys listed in
``COLSTREAM_QDRANT__INDEXED_METADATA``; each matches one value or any of a list.
An unknown key is a 400 that names it, checked before the model runs. A key bound
to a tenant searches only that tenant's pages (:func:`colstream.api.tenancy.scoped_filter`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException
from starlette.concurrency import run_in_threadpool

from colstream.api.auth import Principal
from colstream.api.models import ErrorResponse, SearchRequest, SearchResponse, SearchResult
from colstream.api.protocols import EmbedderLike, model_label
from colstream.api.tenancy import check_filter_keys, scoped_filter
from colstream.infra.vectorstore import METADATA_PAYLOAD_KEY, UnknownFilterKey

if TYPE_CHECKING:
    from colstream.api.app import ApiContext, ServingIndex

log = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 409, 422, 503)}


def finite_rows(vectors: np.ndarray) -> np.ndarray:
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array.reshape(1, -1)
    return array[np.isfinite(array).all(axis=1)]


def to_result(score: float, payload: dict[str, Any]) -> SearchResult | None:
    document_id, page_number = payload.get("document_id"), payload.get("page_number")
    if not isinstance(document_id, str) or not isinstance(page_number, int) or not math.isfinite(score):
        return None
    metadata = payload.get(METADATA_PAYLOAD_KEY)
    return SearchResult(
        document_id=document_id,
        page_number=page_number,
        score=float(score),
        metadata=dict(metadata) if isinstance(metadata, dict) else {},
        model=payload.get("model"),
    )


def build_search_router(ctx: ApiContext, require: Callable[[str], Any]) -> APIRouter:
    router = APIRouter(tags=["search"], responses=_ERRORS)

    async def embed_query(text: str, serving: ServingIndex) -> tuple[EmbedderLike, np.ndarray]:
        if not text.strip():
            raise HTTPException(400, "query text is empty; send the words to search for")
        model = await ctx.get_model(serving)
        (vectors,) = await ctx.run_model(model.embed_queries, [text])
        return model, finite_rows(vectors)

    @router.post("/search", response_model=SearchResponse)
    async def search(request: SearchRequest, principal: Principal = Depends(require("read"))) -> SearchResponse:
        filter_ = scoped_filter(principal, request.filter)
        check_filter_keys(ctx.settings, filter_)
        # One index and its model for the whole search, even across a migration's cutover.
        serving = ctx.serving
        model, vectors = await embed_query(request.query, serving)
        try:
            store = await run_in_threadpool(serving.store.get)
            hits = await run_in_threadpool(
                lambda: store.search(vectors, request.top_k, request.document_id, filter=filter_)
            )
        except UnknownFilterKey as exc:
            raise HTTPException(400, str(exc)) from exc
        except ValueError as exc:
            # InvalidVectorsError: the collection was built by another model (dim mismatch).
            raise HTTPException(409, f"cannot search with {model_label(model)}: {exc}") from exc
        except Exception as exc:
            log.exception("search failed")
            raise HTTPException(503, f"vector store unavailable: {type(exc).__name__}; retry later") from exc
        results = [r for r in (to_result(score, payload) for score, payload in hits) if r is not None]
        return SearchResponse(results=results, query=request.query, model=model_label(model))

    return router
