"""``colstream gc``: the retention sweeper for blobs colstream owns and expired tombstone records.

The rule is :func:`colstream.infra.blob_gc.plan_sweep`; this command reads the
sink's records from the vector store, lists the owned blobs (local blob root or
the Azure upload container), removes what the rule says and prints a summary.
Kubernetes runs the same command as the ``colstream-gc`` CronJob.

With the embedded (Edge) store only one process may open the store at a time:
run it while the sink is stopped, or against a Qdrant server.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from colstream.app import load_settings


def register(app: typer.Typer) -> None:
    app.command("gc")(gc)


def gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say what would be removed; remove nothing")] = False,
    verbose: Annotated[bool, typer.Option("--list", help="also list the removed blob names")] = False,
) -> None:
    """Remove owned blobs no record needs (older than COLSTREAM_GC__ORPHAN_MIN_AGE_S) and tombstone
    records older than the uploads topic's delete.retention.ms."""
    from colstream.infra.blob_gc import open_owned_store, sweep
    from colstream.infra.vectorstore import open_vector_store

    settings = load_settings()
    store = open_vector_store(settings.qdrant)
    try:
        report = sweep(settings, store, open_owned_store(settings), dry_run=dry_run)
    finally:
        store.close()
    body = report.as_dict()
    if verbose:
        body["deleted"] = report.deleted
    print(json.dumps(body))
