"""``colstream migrate``: move the index to another model without downtime.

On the embedded default the store belongs to the running ``colstream run all``, so
every command asks its API (``/admin/migration``, admin scope; the key comes from
``COLSTREAM_API_KEY``), which runs the backfill in its own process and switches
search at cutover without a restart. On a cluster the same steps run as Kubernetes
Jobs (docs/operations.md).

    colstream migrate start --family colpali [--name-or-path P] [--tiny-model]
    colstream migrate status            # documents and pages done of total
    colstream migrate cutover [--force] # search and the alias move to the new index
    colstream migrate finish            # drops the old index
    colstream migrate abort             # drops the new index (serves the old one again)
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from colstream.infra.settings import ColstreamSettings

AsJson = Annotated[bool, typer.Option("--json", help="print the API's JSON answer")]


class MigrateError(Exception):
    """A command that could not run; the message says why and what to do."""


def call_api(settings: ColstreamSettings, method: str, path: str, *, params: dict[str, Any] | None = None,
             body: dict[str, Any] | None = None, timeout_s: float = 600.0) -> dict[str, Any]:
    import httpx

    from colstream.cli.search import API_KEY_ENV, _api_key

    key = _api_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = f"{settings.api.public_url}/admin/migration{path}"
    try:
        response = httpx.request(method, url, params=params, json=body, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise MigrateError(
            f"no colstream API answers at {settings.api.public_url} ({type(exc).__name__}). On the embedded store "
            "the migration runs inside `colstream run all`: start it (or set COLSTREAM_API__PUBLIC_URL). On a "
            "cluster, run the migration Jobs instead (docs/operations.md)"
        ) from exc
    if response.status_code == 401:
        raise MigrateError(f"the API at {settings.api.public_url} needs an admin API key: export {API_KEY_ENV}=<key>")
    if response.status_code == 404 and _json(response).get("detail") in (None, "Not Found"):
        raise MigrateError(f"the API at {settings.api.public_url} serves no migrations (is it `colstream run all` "
                           "on the embedded store?)")
    if response.status_code >= 400:
        raise MigrateError(str(_json(response).get("detail") or response.text[:300]))
    return dict(response.json())


def _json(response: Any) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def summary(status: dict[str, Any]) -> str:
    target, source = status["target"], status["source"]
    lines = [
        f"migration {status['migration_id']}: {status['phase']}",
        f"  from {source['name']} ({source['model']['model_id']})",
        f"  to   {target['name']} ({target['model']['model_id']})",
        f"  search serves {status['serving']}",
    ]
    if "documents" in status:
        docs, pages = status["documents"], status["pages"]
        state = "complete" if status.get("complete") else "in progress"
        lines.append(f"  backfill {state}: {docs['done']}/{docs['total']} documents, "
                     f"{pages['done']}/{pages['total']} pages")
        if status.get("pending"):
            lines.append(f"  waiting for: {', '.join(status['pending'])}")
    return "\n".join(lines)


def _run(settings_and_call: Any, as_json: bool, after: str = "") -> None:
    from colstream.cli.common import fail

    try:
        status = settings_and_call()
    except MigrateError as exc:
        fail(str(exc))
    print(json.dumps(status, indent=2) if as_json else summary(status) + (f"\n{after}" if after else ""))


def start(
    family: Annotated[str, typer.Option("--family", help="the new model's family, e.g. colpali, colqwen2")],
    name_or_path: Annotated[str | None, typer.Option("--name-or-path", help="checkpoint id or folder")] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="hub revision of the checkpoint")] = None,
    tiny_model: Annotated[bool, typer.Option("--tiny-model", help="a tiny checkpoint with RANDOM WEIGHTS (offline)")]
    = False,
    as_json: AsJson = False,
) -> None:
    """Create the new model's index and start the backfill; uploads and deletes reach both indexes."""
    from colstream.app import load_settings

    body = {"family": family, "name_or_path": name_or_path, "revision": revision, "tiny_model": tiny_model}
    _run(lambda: call_api(load_settings(), "POST", "", body=body), as_json,
         "follow it with `colstream migrate status`; then `colstream migrate cutover`")


def status(
    document_id: Annotated[str | None, typer.Option("--document-id", help="also count this document's pages")]
    = None,
    as_json: AsJson = False,
) -> None:
    """Documents and pages the new index holds, of the live total."""
    from colstream.app import load_settings

    params = {"document_id": document_id} if document_id else None
    _run(lambda: call_api(load_settings(), "GET", "", params=params), as_json)


def cutover(
    force: Annotated[bool, typer.Option("--force", help="cut over before the backfill is complete")] = False,
    as_json: AsJson = False,
) -> None:
    """Switch search and the default alias to the new index (refused before the backfill is complete)."""
    from colstream.app import load_settings

    _run(lambda: call_api(load_settings(), "POST", "/cutover", params={"force": str(force).lower()}), as_json,
         "check search, then `colstream migrate finish` (or `abort` to go back)")


def finish(as_json: AsJson = False) -> None:
    """Drop the old index (after cutover); set COLSTREAM_MODEL__* to the new model before the next restart."""
    from colstream.app import load_settings

    _run(lambda: call_api(load_settings(), "POST", "/finish"), as_json,
         "set COLSTREAM_MODEL__FAMILY / COLSTREAM_MODEL__NAME_OR_PATH to the new model before the next restart")


def abort(as_json: AsJson = False) -> None:
    """Drop the new index and serve the old one (before or after cutover)."""
    from colstream.app import load_settings

    _run(lambda: call_api(load_settings(), "POST", "/abort"), as_json)


def register(app: typer.Typer) -> None:
    migrate = typer.Typer(help="move the index to another model without downtime (backfill, cutover, finish)",
                          no_args_is_help=True)
    app.add_typer(migrate, name="migrate")
    for command in (start, status, cutover, finish, abort):
        migrate.command(command.__name__)(command)
