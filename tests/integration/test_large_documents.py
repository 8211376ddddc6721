"""A 1,000-page PDF streams through the splitter without blocking its partition."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from colstream.consumers.splitter.stage import SplitterHandler
from colstream.consumers.splitter.workers import StreamingRenderer
from colstream.embedding.profile import render_target_for
from colstream.infra.blobstore import open_blob_store
from colstream.infra.kafka import ensure_topics
from colstream.infra.stage_runner import StageRunner
from tests.conftest import make_settings
from tests.fixtures import faults
from tests.fixtures.docs import make_many_page_pdf
from tests.harness import kcat_produce, read_all, upload_line, wait_for

pytestmark = pytest.mark.kafka

PAGES = 1000


def test_a_thousand_page_pdf_streams_pages_as_they_render_without_losing_the_partition(
    kafka_bootstrap: str, tiny_colqwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The whole document takes longer than max.poll.interval.ms on purpose: the runner
    # must keep polling (partitions paused) while the renderer works, or the group evicts it.
    settings = make_settings(tmp_path, kafka_bootstrap, tiny_colqwen2).updated(kafka={"max_poll_interval_ms": 6_000})
    ensure_topics(settings)
    (settings.blob.local_root / "big.pdf").write_bytes(make_many_page_pdf(PAGES))
    faults.inject(monkeypatch, on_page=faults.slow_page)
    renderer = StreamingRenderer(processes=2, limits=settings.limits)
    handler = SplitterHandler(settings, open_blob_store(settings), renderer, render_target_for(settings.model))
    runner = StageRunner(settings, handler, topics=[settings.topics.uploads],
                         group_id=f"{settings.consumer_group_prefix}splitter", batch_size=8, batch_timeout_ms=50)
    revoked: list[object] = []
    original_revoke = runner._on_revoke

    def spy_revoke(consumer, partitions):  # type: ignore[no-untyped-def]
        revoked.append(partitions)
        original_revoke(consumer, partitions)

    runner._on_revoke = spy_revoke  # type: ignore[method-assign]
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: runner.assigned, 60, what="splitter assigned")
        t0 = time.monotonic()
        kcat_produce(settings, settings.topics.uploads,
                     [upload_line("big", (settings.blob.local_root / "big.pdf").resolve().as_uri())])
        first_seen = wait_for(lambda: read_all(settings, settings.topics.pages, timeout_s=2) and time.monotonic(),
                              60, interval_s=0.1, what="first page on the topic")
        wait_for(lambda: runner.stats.commits >= 1, 300, what="the upload committed after all its pages")
        elapsed = time.monotonic() - t0
        revoked_while_working = list(revoked)  # closing the consumer revokes too
    finally:
        runner.request_stop()
        thread.join(60)
    pages = [json.loads(v) for k, v in read_all(settings, settings.topics.pages, timeout_s=20) if v]
    assert sorted(p["page_number"] for p in pages) == list(range(1, PAGES + 1))
    assert {p["total_pages"] for p in pages} == {PAGES}
    # pages were published while the rest still rendered, not all at the end
    assert first_seen - t0 < elapsed / 4, (first_seen - t0, elapsed)
    # the document took longer than max.poll.interval.ms, yet the splitter kept its partition
    assert elapsed * 1000 > settings.kafka.max_poll_interval_ms
    assert revoked_while_working == []
    assert renderer.peak_outstanding_pages <= 2 * 8 * 2
