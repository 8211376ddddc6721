"""``colstream demo``: the main job on the embedded default, end to end, in one command.

Starts (or reuses) the local Kafka broker, runs the three stages in this process
with embedded Qdrant and the local blob directory, publishes the bundled sample
documents, waits until the sink has settled each one, and prints the index.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from colstream.app import load_settings, local_kafka, start_pipeline, with_tiny_model
from colstream.cli.common import progress_bar, spinner
from colstream.infra.settings import ColstreamSettings

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
SAMPLE_SUFFIXES = {".pdf", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp"}


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def wait_until_settled(store: Any, versions: dict[str, int], timeout_s: float,
                       on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Poll the sink's records until each document has settled at (or past) its published version;
    ``on_progress`` hears how many have settled so far."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = store.get_records(list(versions))
        pending = [
            d for d, v in versions.items()
            if d not in records or records[d].version < v or records[d].state == "indexing"
        ]
        if on_progress is not None:
            on_progress(len(versions) - len(pending))
        if not pending:
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"not settled after {timeout_s:.0f}s: {pending}")
        time.sleep(0.25)


def demo(
    samples: Annotated[Path, typer.Option("--samples", help="folder of documents to ingest")] = SAMPLES,
    real_model: Annotated[bool, typer.Option(
        "--real-model", help="load the configured model id instead of the tiny random-weight checkpoint")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="seconds to wait for every document to settle")]
    = 600.0,
    query: Annotated[str, typer.Option("--query", help="search query run on the index at the end")]
    = "quarterly revenue table",
) -> None:
    """Ingest the bundled samples on the embedded default (local broker, embedded Qdrant) and print the index."""
    raise typer.Exit(run_demo(samples, real_model=real_model, timeout_s=timeout, query=query))


def run_demo(samples: Path, *, real_model: bool, timeout_s: float, query: str) -> int:
    from colstream.cli.main import document_row, print_documents
    from colstream.producers.publisher import UploadPublisher

    settings = load_settings()
    started_broker = not settings.kafka.bootstrap_servers and not local_kafka(settings).is_running()
    if not real_model:
        settings = with_tiny_model(settings)
    files = sorted(p for p in Path(samples).iterdir() if p.suffix.lower() in SAMPLE_SUFFIXES)
    if not files:
        print(f"no sample documents in {samples}")
        return 2

    t0 = time.monotonic()
    with spinner("starting the broker, the model and the stages"):
        pipeline = start_pipeline(settings)
    settings, store = pipeline.settings, pipeline.store
    publisher = UploadPublisher(settings)
    try:
        versions: dict[str, int] = {}
        for path in files:
            published = publisher.publish_file(path, f"sample-{path.stem}")
            assert published.offset is not None
            versions[published.key] = published.offset
            print(f"published {path.name} -> {published.key} (version {published.offset})")
        with progress_bar("indexing", total=len(versions)) as progress:
            task = progress.task_ids[0]
            records = wait_until_settled(store, versions, timeout_s,
                                         lambda done: progress.update(task, completed=done))
        elapsed = time.monotonic() - t0
        print()
        print_documents([document_row(r) for r in records.values()], as_json=False)
        total = sum(len(r.indexed_pages) for r in records.values())
        print(f"\nindexed {total} pages from {len(files)} documents in {elapsed:.1f}s "
              f"into {store.stats().get('backend', 'qdrant')} collection '{settings.qdrant.collection}' "
              f"under {settings.qdrant.path}")
        model_name = next((r.model for r in records.values() if r.model), settings.model.name_or_path)
        print(f"model: {model_name}")
        _search_demo(settings, store, query)
    finally:
        publisher.close()
        pipeline.stop()
        if started_broker:
            local_kafka(settings).stop()
    return 1 if pipeline.stages.failures else 0


def _search_demo(settings: ColstreamSettings, store: Any, query: str) -> None:
    from colstream.embedding.model import load_model

    model = load_model(settings.model)
    query_vectors = model.embed_queries([query])[0]
    hits = store.search(query_vectors, limit=3)
    label = " (random weights: scores are not meaningful)" if model.is_random_weights else ""
    print(f"\nsearch {query!r}{label}:")
    for score, payload in hits:
        print(f"  {score:8.3f}  {payload['document_id']} page {payload['page_number']}/{payload['total_pages']}")
