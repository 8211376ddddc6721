"""The ``colstream`` command: local broker, topics, publishing, stages, read models, tools."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from enum import StrEnum
from typing import Annotated, Any

import typer

from colstream import __version__
from colstream.app import (
    PIPELINE_STAGES,
    load_settings,
    local_kafka,
    resolve_broker,
    run_all,
    run_stage,
    serve_api,
    with_tiny_model,
)
from colstream.cli.common import connect, err_console, fail, setup_logging, spinner
from colstream.infra.settings import ColstreamSettings

log = logging.getLogger("colstream")

app = typer.Typer(
    name="colstream",
    help="Documents in, ColPali-family multivectors in Qdrant, through Kafka: a local broker, topics, "
         "publishing, the stages, read models and operator tools.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"colstream {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True,
                                         help="more log output: -v colstream DEBUG and libraries INFO, -vv all DEBUG")]
    = 0,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    setup_logging(verbosity=verbose)


# -- kafka -------------------------------------------------------------------------
kafka_app = typer.Typer(help="the local Apache Kafka broker (KRaft) for development", no_args_is_help=True)
app.add_typer(kafka_app, name="kafka")


@kafka_app.command("start")
def kafka_start() -> None:
    """Start the local broker (downloads the Kafka jars once) and write console tool scripts."""
    settings = load_settings()
    if settings.kafka.bootstrap_servers:
        print(f"KAFKA_BOOTSTRAP_SERVERS={settings.kafka.bootstrap_servers} is set; not starting a local broker")
        return
    broker = local_kafka(settings)
    t0 = time.monotonic()
    with spinner("starting the local Kafka broker (the first start fetches its jars)"):
        servers = broker.start()
        bin_dir = broker.write_tool_scripts()
    print(f"Kafka {broker.status()['kafka_version']} (KRaft) answering on {servers} "
          f"after {time.monotonic() - t0:.1f}s; console tools in {bin_dir}")


@kafka_app.command("stop")
def kafka_stop() -> None:
    """Stop the local broker started by `colstream kafka start`."""
    print("stopped" if local_kafka(load_settings()).stop() else "not running (no pid file)")


@kafka_app.command("status")
def kafka_status() -> None:
    """Print the local broker's state as JSON (running, pid, port, version)."""
    print(json.dumps(local_kafka(load_settings()).status(), indent=2))


@kafka_app.command(
    "tool",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def kafka_tool(
    ctx: typer.Context,
    tool: Annotated[str | None, typer.Argument(
        help="kafka-console-producer|kafka-console-consumer|kafka-consumer-groups|kafka-topics|...; "
             "every further argument goes to the tool")] = None,
) -> None:
    """Run one of Kafka's console tools with the local broker's jars; arguments pass through."""
    from colstream.infra.local_kafka import tool_command

    if tool in (None, "-h", "--help"):
        print("usage: colstream kafka tool TOOL [ARGS...]\n\n"
              "Runs one of Kafka's console tools from the local broker's jars, e.g.\n"
              "  colstream kafka tool kafka-console-producer --bootstrap-server 127.0.0.1:9092 --topic uploads\n"
              "  colstream kafka tool kafka-consumer-groups --bootstrap-server 127.0.0.1:9092 --list\n"
              "Every argument after TOOL goes to the tool (`... TOOL --help` shows the tool's own help).")
        raise typer.Exit(0 if tool else 2)
    raise typer.Exit(subprocess.call(tool_command(tool, list(ctx.args))))


# -- topics ------------------------------------------------------------------------
class TopicsAction(StrEnum):
    create = "create"


@app.command("topics")
def topics(
    action: Annotated[TopicsAction, typer.Argument(help="create: create the pipeline's topics (idempotent)")],
    start_broker: Annotated[bool, typer.Option("--start-broker", help="start the local broker if none answers")]
    = False,
) -> None:
    """Create the pipeline's topics with their configs (idempotent)."""
    from colstream.infra.kafka import ensure_topics

    settings = connect(start=start_broker)
    for name, outcome in ensure_topics(settings).items():
        print(f"{name}: {outcome}")


# -- publish -----------------------------------------------------------------------
publish_app = typer.Typer(help="publish an upload event or a delete (tombstone)", no_args_is_help=True)
app.add_typer(publish_app, name="publish")


@publish_app.command("upload")
def publish_upload(
    path_or_uri: Annotated[str, typer.Argument(
        help="a file, a folder (every matching file, recursively), or a blob URI (az://, https://, file://)")],
    document_id: Annotated[str | None, typer.Option(
        "--document-id", help="document id; for a folder, a prefix joined to each file's relative path")] = None,
    metadata: Annotated[str | None, typer.Option("--metadata", help="JSON object stored with the document")] = None,
    filename: Annotated[str | None, typer.Option("--filename", help="filename recorded for a blob URI")] = None,
    content_type: Annotated[str | None, typer.Option("--content-type", help="MIME type, when not sniffed")] = None,
    glob: Annotated[str, typer.Option("--glob", help="for a folder: which files, matched recursively")] = "*",
) -> None:
    """Publish an upload: a local file or folder (copied to blob storage first) or a blob URI."""
    from colstream.cli.publish import publish_upload as run_upload

    try:
        meta = json.loads(metadata) if metadata else None
    except ValueError as exc:
        fail(f"--metadata is not JSON: {exc}", code=2)
    if meta is not None and not isinstance(meta, dict):
        fail("--metadata must be a JSON object", code=2)
    raise typer.Exit(run_upload(path_or_uri, document_id=document_id, metadata=meta, filename=filename,
                                content_type=content_type, glob=glob))


@publish_app.command("delete")
def publish_delete(document_id: Annotated[str, typer.Argument(help="the document to remove (a tombstone)")]) -> None:
    """Publish a tombstone: the pipeline removes the document from the index."""
    from colstream.producers.publisher import UploadPublisher

    publisher = UploadPublisher(connect())
    try:
        print(publisher.publish_delete(document_id).describe())
    finally:
        publisher.close()


# -- stages ------------------------------------------------------------------------
run_app = typer.Typer(help="run a stage, the API, or everything in one process", no_args_is_help=True)
app.add_typer(run_app, name="run")

TinyModel = Annotated[bool, typer.Option("--tiny-model",
                                         help="use a locally built tiny checkpoint with RANDOM WEIGHTS (offline)")]
NoApi = Annotated[bool, typer.Option("--no-api", help="with `all`: do not serve the HTTP API")]


def _stage_settings(tiny_model: bool) -> ColstreamSettings:
    settings = load_settings()
    return with_tiny_model(settings) if tiny_model else settings


def _register_stage(name: str) -> None:
    def command(tiny_model: TinyModel = False) -> None:
        settings = _stage_settings(tiny_model)
        setup_logging(settings, stage=name)
        # A wrong password or protocol ends here in one line, not in a consumer that retries forever;
        # a broker that is down or restarting is waited for.
        from colstream.infra.health import HealthPortInUse

        connected = connect(settings, wait_for_broker=True)
        try:
            code = run_stage(name, connected)  # type: ignore[arg-type]
        except HealthPortInUse as exc:
            fail(str(exc))
        raise typer.Exit(code)

    command.__doc__ = (f"Run the {name} stage alone; serves /metrics, /livez and /readyz on "
                       "COLSTREAM_METRICS__PORT (9400).")
    run_app.command(name)(command)


for _stage in PIPELINE_STAGES:
    _register_stage(_stage)


@run_app.command("api")
def run_api(tiny_model: TinyModel = False) -> None:
    """Serve the REST API (with /metrics) on COLSTREAM_API__PORT."""
    settings = resolve_broker(_stage_settings(tiny_model), start=False)
    setup_logging(settings, stage="api")
    serve_api(settings)


@run_app.command("all")
def run_everything(tiny_model: TinyModel = False, no_api: NoApi = False) -> None:
    """Every stage in one process over one embedded store, plus the API (starts a local broker if needed)."""
    settings = _stage_settings(tiny_model)
    setup_logging(settings)
    raise typer.Exit(run_all(settings, with_api=not no_api))


# -- read models ---------------------------------------------------------------------
def _records_from_api(settings: ColstreamSettings) -> list[dict[str, Any]] | None:
    import httpx

    try:
        response = httpx.get(f"{settings.api.public_url}/documents", timeout=5.0)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return list(response.json())


def list_documents(settings: ColstreamSettings) -> list[dict[str, Any]]:
    # The embedded store is single-process: while `run all` holds it, ask its API.
    rows = _records_from_api(settings)
    if rows is not None:
        return rows
    from colstream.infra.vectorstore import open_vector_store

    store = open_vector_store(settings.qdrant)
    try:
        return [document_row(r) for r in store.list_records() if r.state != "deleted"]
    finally:
        store.close()


def document_row(record: Any) -> dict[str, Any]:
    return {
        "document_id": record.document_id,
        "filename": record.filename,
        "total_pages": record.total_pages,
        "embedding_dimension": record.embedding_dimension,
        "state": record.state,
        "version": record.version,
        "indexed_pages": len(record.indexed_pages),
        "failed_pages": list(record.failed_pages),
    }


def print_documents(rows: list[dict[str, Any]], as_json: bool) -> None:
    rows = sorted(rows, key=lambda r: r["document_id"])
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'document_id':<32} {'filename':<28} {'pages':>5} {'indexed':>7} {'dim':>4}  state")
    for r in rows:
        print(f"{r['document_id']:<32} {str(r['filename'])[:28]:<28} {r['total_pages']:>5} "
              f"{r.get('indexed_pages', ''):>7} {r['embedding_dimension']!s:>4}  {r.get('state', '')}")
    print(f"{len(rows)} documents")


AsJson = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


@app.command("documents")
def documents(as_json: AsJson = False) -> None:
    """List indexed documents (from the running API, else from the store)."""
    print_documents(list_documents(load_settings()), as_json)


def _register_modules() -> None:
    from colstream.cli import demo, doctor, gc, migrate, models, ops, search

    demo.register(app)
    models.register(app)
    ops.register(app)
    doctor.register(app)
    search.register(app)
    gc.register(app)
    migrate.register(app)


_register_modules()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (``--help`` and usage errors included) instead of
    exiting. Broker and settings failures end as one line on stderr, never a traceback."""
    from confluent_kafka import KafkaException

    from colstream.api.auth import KeyConfigError, UnauthenticatedBind
    from colstream.infra.kafka_check import BrokerProblem, explain

    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="colstream", standalone_mode=True)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            err_console.print(f"[bold red]error:[/bold red] {exc.code}")
            return 1
        return int(exc.code or 0)
    except (BrokerProblem, KeyConfigError, UnauthenticatedBind) as exc:
        err_console.print(f"[bold red]error:[/bold red] {exc}")
        return 1
    except KafkaException as exc:
        err_console.print(f"[bold red]error:[/bold red] {explain(load_settings(), exc.args[0])}")
        return 1
    return 0
