"""The ``colstream`` command: local broker, topics, publishing, stages, read models, tools."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from colstream.app import (
    PIPELINE_STAGES,
    build_stage,
    load_settings,
    local_kafka,
    resolve_broker,
    serve_api,
    serve_api_in_thread,
    start_pipeline,
    with_tiny_model,
)
from colstream.infra.settings import ColstreamSettings

log = logging.getLogger("colstream")


# -- kafka -------------------------------------------------------------------------
def cmd_kafka(args: argparse.Namespace) -> int:
    from colstream.infra.local_kafka import tool_command

    settings = load_settings()
    broker = local_kafka(settings)
    if args.action == "start":
        if settings.kafka.bootstrap_servers:
            print(f"KAFKA_BOOTSTRAP_SERVERS={settings.kafka.bootstrap_servers} is set; not starting a local broker")
            return 0
        t0 = time.monotonic()
        servers = broker.start()
        bin_dir = broker.write_tool_scripts()
        print(f"Kafka {broker.status()['kafka_version']} (KRaft) answering on {servers} "
              f"after {time.monotonic() - t0:.1f}s; console tools in {bin_dir}")
    elif args.action == "stop":
        print("stopped" if broker.stop() else "not running (no pid file)")
    elif args.action == "status":
        print(json.dumps(broker.status(), indent=2))
    elif args.action == "tool":
        if not args.tool_args:
            print("usage: colstream kafka tool kafka-console-producer --bootstrap-server ... --topic ...")
            return 2
        cmd = tool_command(args.tool_args[0], args.tool_args[1:])
        return subprocess.call(cmd)
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from colstream.infra.kafka import ensure_topics

    settings = resolve_broker(load_settings(), start=args.start_broker)
    for name, outcome in ensure_topics(settings).items():
        print(f"{name}: {outcome}")
    return 0


# -- publish -----------------------------------------------------------------------
def cmd_publish(args: argparse.Namespace) -> int:
    from colstream.producers.publisher import UploadPublisher
    from colstream.schemas import UploadEvent

    settings = resolve_broker(load_settings(), start=False)
    publisher = UploadPublisher(settings)
    try:
        if args.action == "delete":
            published = publisher.publish_delete(args.document_id)
        else:
            metadata = json.loads(args.metadata) if args.metadata else None
            target = args.path_or_uri
            if "://" in target:
                event = UploadEvent(document_id=args.document_id, blob_uri=target, filename=args.filename,
                                    content_type=args.content_type, metadata=metadata)
                published = publisher.publish_upload(event)
            else:
                path = Path(target)
                if not path.is_file():
                    print(f"error: {path} is not a file", file=sys.stderr)
                    return 2
                published = publisher.publish_file(path, args.document_id, metadata=metadata,
                                                   content_type=args.content_type)
        print(published.describe())
    finally:
        publisher.close()
    return 0


# -- stages ------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    settings = load_settings()
    if args.tiny_model:
        settings = with_tiny_model(settings)
    if args.stage == "all":
        return run_all(settings, with_api=not args.no_api)
    settings = resolve_broker(settings, start=False)
    if args.stage == "api":
        serve_api(settings)
        return 0
    runner = build_stage(args.stage, settings)
    runner.install_signal_handlers()
    runner.run()
    return 0


def run_all(settings: ColstreamSettings, with_api: bool = True) -> int:
    pipeline = start_pipeline(settings)
    settings = pipeline.settings
    if with_api:
        server = serve_api_in_thread(settings, store=pipeline.store, stage_stats=pipeline.stages.stats)
        pipeline.on_stop.append(lambda: setattr(server, "should_exit", True))
        print(f"colstream: pipeline running; API on http://{settings.api.host}:{settings.api.port} "
              "(GET /health, GET /documents). Ctrl-C to stop.", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        stop.wait(1.0)
        if pipeline.stages.failures:
            break
    pipeline.stop()
    return 1 if pipeline.stages.failures else 0


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


def cmd_documents(args: argparse.Namespace) -> int:
    print_documents(list_documents(load_settings()), args.json)
    return 0


# -- models ------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    from colstream.embedding.tiny import build_tiny_checkpoint

    out = build_tiny_checkpoint(args.family, Path(args.out))
    print(f"built a tiny {args.family} checkpoint with RANDOM WEIGHTS at {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colstream", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    kafka = sub.add_parser("kafka", help="the local Apache Kafka broker (KRaft) for development")
    kafka.add_argument("action", choices=["start", "stop", "status", "tool"])
    kafka.add_argument("tool_args", nargs=argparse.REMAINDER,
                       help="for `tool`: kafka-console-producer|kafka-console-consumer|kafka-consumer-groups|...")
    kafka.set_defaults(func=cmd_kafka)

    topics = sub.add_parser("topics", help="create the pipeline's topics (idempotent)")
    topics.add_argument("action", choices=["create"])
    topics.add_argument("--start-broker", action="store_true", help="start the local broker if none answers")
    topics.set_defaults(func=cmd_topics)

    publish = sub.add_parser("publish", help="publish an upload event or a delete (tombstone)")
    pub_sub = publish.add_subparsers(dest="action", required=True)
    up = pub_sub.add_parser("upload")
    up.add_argument("--document-id", required=True)
    up.add_argument("--metadata", help="JSON object stored with the document")
    up.add_argument("--filename")
    up.add_argument("--content-type")
    up.add_argument("path_or_uri")
    de = pub_sub.add_parser("delete")
    de.add_argument("document_id")
    publish.set_defaults(func=cmd_publish)

    run = sub.add_parser("run", help="run a stage, the API, or everything in one process")
    run.add_argument("stage", choices=[*PIPELINE_STAGES, "api", "all"])
    run.add_argument("--tiny-model", action="store_true",
                     help="use a locally built tiny checkpoint with RANDOM WEIGHTS (offline)")
    run.add_argument("--no-api", action="store_true", help="with `all`: do not serve the HTTP API")
    run.set_defaults(func=cmd_run)

    docs = sub.add_parser("documents", help="list indexed documents")
    docs.add_argument("--json", action="store_true")
    docs.set_defaults(func=cmd_documents)

    models = sub.add_parser("models", help="build tiny random-weight checkpoints for offline use")
    models.add_argument("action", choices=["build-tiny"])
    models.add_argument("--family", choices=["colqwen2", "colpali"], default="colqwen2")
    models.add_argument("--out", required=True)
    models.set_defaults(func=cmd_models)

    from colstream.cli import demo, ops

    demo.register(sub)
    ops.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else getattr(logging, os.environ.get("COLSTREAM_LOG_LEVEL", "INFO")),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)
