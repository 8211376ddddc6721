"""``colstream search "query" --filter tenant=acme --top-k 5``.

While ``colstream run all`` (or ``run api``) serves, the search goes through its
``POST /search``: the embedded store belongs to that process. Otherwise the store
is opened here and the query embedded with the index's own model.

Filters: ``--filter key=value`` (a string), ``--filter key=a,b`` (any of a list),
``--filter key:=<json>`` (a number, a boolean or a list). Keys are ``document_id``
or metadata keys listed in ``COLSTREAM_QDRANT__INDEXED_METADATA``. With API keys
configured, the CLI sends ``COLSTREAM_API_KEY`` as a bearer token.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from colstream.infra.settings import ColstreamSettings

API_KEY_ENV = "COLSTREAM_API_KEY"


class SearchError(Exception):
    """A search the user can fix (a bad filter, a refused key); the message says how."""


def parse_filters(items: Sequence[str]) -> dict[str, Any]:
    """``key=value``, ``key=a,b`` and ``key:=<json>``; a key given twice matches any of its values."""
    merged: dict[str, list[Any]] = {}
    for item in items:
        if ":=" in item:
            key, raw = item.split(":=", 1)
            try:
                value: Any = json.loads(raw)
            except ValueError as exc:
                raise SearchError(f"--filter {item!r}: the value after ':=' is not JSON") from exc
        elif "=" in item:
            key, raw = item.split("=", 1)
            value = raw.split(",") if "," in raw else raw
        else:
            raise SearchError(f"--filter {item!r}: write key=value, key=a,b or key:=<json>")
        key = key.strip()
        if not key:
            raise SearchError(f"--filter {item!r}: the key is empty")
        values = value if isinstance(value, list) else [value]
        merged.setdefault(key, []).extend(values)
    return {key: values[0] if len(values) == 1 else values for key, values in merged.items()}


def _api_key() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def search_via_api(settings: ColstreamSettings, query: str, filters: dict[str, Any], top_k: int) -> list[dict] | None:
    """The running API's results, or None when no API answers."""
    import httpx

    key = _api_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body: dict[str, Any] = {"query": query, "top_k": top_k}
    if filters:
        body["filter"] = filters
    try:
        response = httpx.post(f"{settings.api.public_url}/search", json=body, headers=headers, timeout=120.0)
    except httpx.HTTPError:
        return None
    if response.status_code == 401:
        raise SearchError(f"the API at {settings.api.public_url} needs an API key: export {API_KEY_ENV}=<key>")
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text[:300]
        raise SearchError(f"the API answered {response.status_code}: {detail}")
    return list(response.json()["results"])


def search_store(settings: ColstreamSettings, query: str, filters: dict[str, Any], top_k: int) -> list[dict]:
    """Search the configured store directly, embedding the query with the index's model."""
    import numpy as np

    from colstream.api.search import finite_rows, to_result
    from colstream.embedding.model import load_model
    from colstream.embedding.profile import model_settings_for_index
    from colstream.infra.vectorstore import UnknownFilterKey, filter_terms, open_vector_store

    try:
        filter_terms(settings.qdrant, filters)
    except UnknownFilterKey as exc:
        raise SearchError(str(exc)) from exc
    store = open_vector_store(settings.qdrant)
    try:
        model = load_model(model_settings_for_index(settings.model, store.index_model()))
        (vectors,) = model.embed_queries([query])
        hits = store.search(finite_rows(np.asarray(vectors)), top_k, filter=filters or None)
    finally:
        store.close()
    results = [to_result(score, payload) for score, payload in hits]
    return [r.model_dump() for r in results if r is not None]


def run_search(settings: ColstreamSettings, query: str, filters: Sequence[str], top_k: int) -> list[dict]:
    parsed = parse_filters(filters)
    results = search_via_api(settings, query, parsed, top_k)
    if results is None:
        results = search_store(settings, query, parsed, top_k)
    return results


def print_results(results: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'score':>8}  {'document_id':<32} {'page':>4}  metadata")
    for r in results:
        metadata = json.dumps(r.get("metadata") or {}, separators=(",", ":"))
        print(f"{r['score']:>8.3f}  {r['document_id']:<32} {r['page_number']:>4}  {metadata}")
    print(f"{len(results)} results")


def search(
    query: Annotated[str, typer.Argument(help="the words to search for")],
    filters: Annotated[
        list[str] | None,
        typer.Option("--filter", help="key=value, key=a,b (any of) or key:=<json>; repeatable (all must match)"),
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, max=100, help="how many pages")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Search indexed pages (through the running API, else the store), with metadata filters."""
    from colstream.app import load_settings
    from colstream.cli.common import fail

    try:
        results = run_search(load_settings(), query, filters or [], top_k)
    except SearchError as exc:
        fail(str(exc))
    print_results(results, as_json)


def register(app: typer.Typer) -> None:
    app.command("search")(search)
