"""``colstream migrate``: move the index to another model without downtime.

On the embedded default the store belongs to the running ``colstream run all``, so
every command asks its API (``/admin/migration``, admin scope; the key comes from
``COLSTREAM_API_KEY``), which runs the backfill in its own process and switches
search at cutover without a restart. On a cluster (``--cluster``) each step runs where
it is called, against the Qdrant server and Kafka, as the Kubernetes Jobs of
k8s/components/migration do, and ``colstream migrate backfill`` is the backfill Job
(:mod:`colstream.migration.cluster`; docs/operations.md).

    colstream migrate start --family colpali [--name-or-path P] [--tiny-model] [--cluster]
    colstream migrate status [--cluster]            # documents and pages done of total
    colstream migrate cutover [--force] [--cluster] # search and the alias move to the new index
    colstream migrate finish [--cluster]            # drops the old index
    colstream migrate abort [--cluster]             # drops the new index (serves the old one again)
    colstream migrate backfill                      # the backfill Job (a Qdrant server only)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

import typer

from colstream.infra.settings import ColstreamSettings

AsJson = Annotated[bool, typer.Option("--json", help="print the API's JSON answer")]
Cluster = Annotated[bool, typer.Option(
    "--cluster", help="run the step here against the Qdrant server and Kafka (the Kubernetes Jobs do this) "
    "instead of asking a running `colstream run all`")]


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


def _cluster(settings: ColstreamSettings) -> Any:
    from colstream.migration.cluster import ClusterMigrations

    if not settings.qdrant.url:
        raise MigrateError("--cluster needs a Qdrant server (QDRANT_URL): the embedded store belongs to "
                           "`colstream run all`, which runs the migration itself")
    return ClusterMigrations(settings)


def _step(cluster: bool, through_api: Callable[[ColstreamSettings], dict[str, Any]],
          here: Callable[[Any], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """The step through the running API, or (``--cluster``) carried out in this process."""
    from colstream.app import load_settings

    def call() -> dict[str, Any]:
        settings = load_settings()
        if not cluster:
            return through_api(settings)
        from confluent_kafka import KafkaException
        from pydantic import ValidationError
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        from colstream.migration.core import MigrationError

        try:
            return here(_cluster(settings))
        except MigrationError as exc:
            raise MigrateError(exc.message) from exc
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise MigrateError(f"the new model's settings are invalid: {where}: {first['msg']}") from exc
        except (ResponseHandlingException, UnexpectedResponse) as exc:
            raise MigrateError(f"the Qdrant server at {settings.qdrant.url} did not answer as expected: {exc}") from exc
        except KafkaException as exc:
            raise MigrateError(f"Kafka at {settings.kafka.bootstrap_servers}: {exc}") from exc

    return call


def start(
    family: Annotated[str, typer.Option("--family", help="the new model's family, e.g. colpali, colqwen2")],
    name_or_path: Annotated[str | None, typer.Option("--name-or-path", help="checkpoint id or folder")] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="hub revision of the checkpoint")] = None,
    tiny_model: Annotated[bool, typer.Option("--tiny-model", help="a tiny checkpoint with RANDOM WEIGHTS (offline)")]
    = False,
    cluster: Cluster = False,
    as_json: AsJson = False,
) -> None:
    """Create the new model's index and start the backfill; uploads and deletes reach both indexes."""
    # Empty strings are "not given": a Job passes $(VARIABLES) that may be empty.
    name_or_path, revision = name_or_path or None, revision or None
    body = {"family": family, "name_or_path": name_or_path, "revision": revision, "tiny_model": tiny_model}
    after = ("follow it with `colstream migrate status`; then `colstream migrate cutover`" if not cluster else
             "the backfill Job (`colstream migrate backfill`) re-embeds every live document; follow it with "
             "`colstream migrate status --cluster`")
    _run(_step(cluster, lambda s: call_api(s, "POST", "", body=body),
               lambda m: m.start(family, name_or_path, revision, tiny_model)), as_json, after)


def status(
    document_id: Annotated[str | None, typer.Option("--document-id", help="also count this document's pages")]
    = None,
    cluster: Cluster = False,
    as_json: AsJson = False,
) -> None:
    """Documents and pages the new index holds, of the live total."""
    params = {"document_id": document_id} if document_id else None
    _run(_step(cluster, lambda s: call_api(s, "GET", "", params=params), lambda m: m.status(document_id)), as_json)


def cutover(
    force: Annotated[bool, typer.Option("--force", help="cut over before the backfill is complete")] = False,
    cluster: Cluster = False,
    as_json: AsJson = False,
) -> None:
    """Switch search and the default alias to the new index (refused before the backfill is complete)."""
    after = ("check search, then `colstream migrate finish` (or `abort` to go back)" if not cluster else
             "the API replicas follow the alias within COLSTREAM_QDRANT__ALIAS_FOLLOW_S; roll the splitter, "
             "embedder and sink to the new model, then `colstream migrate finish --cluster`")
    _run(_step(cluster, lambda s: call_api(s, "POST", "/cutover", params={"force": str(force).lower()}),
               lambda m: m.cutover(force)), as_json, after)


def finish(cluster: Cluster = False, as_json: AsJson = False) -> None:
    """Drop the old index (after cutover); set COLSTREAM_MODEL__* to the new model before the next restart."""
    after = ("set COLSTREAM_MODEL__FAMILY / COLSTREAM_MODEL__NAME_OR_PATH to the new model before the next restart"
             if not cluster else "the backfill Job has stopped and its topics and consumer groups are gone")
    _run(_step(cluster, lambda s: call_api(s, "POST", "/finish"), lambda m: m.finish()), as_json, after)


def abort(cluster: Cluster = False, as_json: AsJson = False) -> None:
    """Drop the new index and serve the old one (before or after cutover)."""
    _run(_step(cluster, lambda s: call_api(s, "POST", "/abort"), lambda m: m.abort()), as_json)


def backfill(
    stages: Annotated[list[str] | None, typer.Option(
        "--stage", help="run only this stage (repeatable): the embedder on a GPU node, splitter and sink on the "
        "CPU image")] = None,
) -> None:
    """The backfill Job: the new model's splitter, embedder and sink into the new index, until the migration
    is finished or aborted (a Qdrant server only; serves /metrics, /livez, /readyz on COLSTREAM_METRICS__PORT)."""
    from colstream.app import load_settings, serve_backfill
    from colstream.cli.common import fail, setup_logging
    from colstream.migration.core import BACKFILL_STAGES

    unknown = sorted(set(stages or ()) - set(BACKFILL_STAGES))
    if unknown:
        fail(f"the backfill runs {', '.join(BACKFILL_STAGES)}; not {', '.join(unknown)}")
    settings = load_settings()
    setup_logging(settings, stage="backfill")
    if not settings.qdrant.url:
        fail("the backfill Job needs a Qdrant server (QDRANT_URL); on the embedded store `colstream run all` "
             "runs the backfill itself")
    raise typer.Exit(serve_backfill(settings, stages))


def register(app: typer.Typer) -> None:
    migrate = typer.Typer(help="move the index to another model without downtime (backfill, cutover, finish)",
                          no_args_is_help=True)
    app.add_typer(migrate, name="migrate")
    for command in (start, status, cutover, finish, abort, backfill):
        migrate.command(command.__name__)(command)
