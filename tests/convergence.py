"""The latest-event-wins model the index must converge to, and how to compare against it."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colstream.infra.kafka import committed_offsets
from colstream.infra.settings import ColstreamSettings
from colstream.producers.publisher import UploadPublisher
from colstream.schemas import UploadEvent
from tests.fixtures.docs import make_pdf

REPORT_DIR = Path(os.environ.get("COLSTREAM_STATE_DIR", Path(__file__).resolve().parent.parent / ".colstream"))


@dataclass
class IndexModel:
    """What Qdrant must hold: per document, the latest upload's blob and page count, or nothing."""

    latest: dict[str, tuple[str, int] | None] = field(default_factory=dict)
    operations: int = 0

    def upload(self, doc: str, uri: str, pages: int) -> None:
        self.latest[doc] = (uri, pages)
        self.operations += 1

    def delete(self, doc: str) -> None:
        self.latest[doc] = None
        self.operations += 1


@dataclass
class Divergence:
    lost: int = 0
    stale: int = 0
    duplicated: int = 0
    details: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.stale or self.duplicated)


def compare(store: Any, model: IndexModel) -> Divergence:
    result = Divergence()
    payloads = store.page_payloads()
    seen: dict[tuple[str, int], int] = {}
    for p in payloads:
        key = (p["document_id"], p["page_number"])
        seen[key] = seen.get(key, 0) + 1
    result.duplicated = sum(n - 1 for n in seen.values() if n > 1)
    by_doc: dict[str, list[dict[str, Any]]] = {}
    for p in payloads:
        by_doc.setdefault(p["document_id"], []).append(p)
    for doc in set(model.latest) | set(by_doc):
        expected = model.latest.get(doc)
        have = by_doc.get(doc, [])
        if expected is None:
            if have:
                result.stale += len(have)
                result.details.append(f"{doc}: {len(have)} pages of a deleted document")
            continue
        uri, pages = expected
        current = {p["page_number"] for p in have if p["blob_uri"] == uri and p["total_pages"] == pages}
        wrong = [p for p in have if p["blob_uri"] != uri or p["page_number"] > pages]
        missing = set(range(1, pages + 1)) - current
        result.lost += len(missing)
        result.stale += len(wrong)
        if missing or wrong:
            result.details.append(f"{doc}: missing {sorted(missing)}, stale {len(wrong)}")
    return result


def write_report(name: str, figures: dict[str, Any]) -> None:
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    path = REPORT_DIR / "convergence-report.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = {**figures, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.write_text(json.dumps(data, indent=2))
    print(f"\n[{name}] {json.dumps(figures)}")


def keep_failing_seed(name: str, seed: int, divergence: Divergence) -> None:
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    with open(REPORT_DIR / "failing-seeds.txt", "a") as fh:
        fh.write(f"{name} seed={seed} lost={divergence.lost} stale={divergence.stale} "
                 f"dup={divergence.duplicated} {divergence.details[:5]}\n")


class DocumentFactory:
    """Distinct blobs per upload, so every page in Qdrant says which upload it came from."""

    def __init__(self, settings: ColstreamSettings, max_pages: int = 5) -> None:
        self.root = settings.blob.local_root / "ops"
        self.root.mkdir(parents=True, exist_ok=True)
        self.templates = {n: make_pdf(n) for n in range(1, max_pages + 1)}
        self.count = 0

    def blob(self, pages: int) -> str:
        self.count += 1
        path = self.root / f"op-{self.count}-{pages}p.pdf"
        path.write_bytes(self.templates[pages])
        return path.resolve().as_uri()


def publish_random_operations(
    publisher: UploadPublisher, factory: DocumentFactory, model: IndexModel, rng: random.Random,
    count: int, doc_ids: list[str], max_pages: int, delete_ratio: float = 0.25,
) -> None:
    for _ in range(count):
        doc = rng.choice(doc_ids)
        if rng.random() < delete_ratio:
            publisher.publish_delete(doc, wait=False)
            model.delete(doc)
        else:
            pages = rng.randint(1, max_pages)
            uri = factory.blob(pages)
            publisher.publish_upload(UploadEvent(document_id=doc, blob_uri=uri), wait=False)
            model.upload(doc, uri, pages)
    publisher.producer.flush_or_raise()


def group_lag(settings: ColstreamSettings, committed_out: dict[str, int] | None = None) -> dict[str, int]:
    """Records not yet committed by each stage's consumer group (and, optionally, how many were)."""
    lags: dict[str, int] = {}
    for stage, topic in (("splitter", settings.topics.uploads), ("embedder", settings.topics.pages),
                         ("sink", settings.topics.vectors)):
        group = f"{settings.consumer_group_prefix}{stage}"
        lag = done = 0
        for committed, low, high in committed_offsets(settings, group, topic).values():
            position = committed if committed >= 0 else low
            lag += max(0, high - position)
            done += max(0, position - low)
        lags[stage] = lag
        if committed_out is not None:
            committed_out[stage] = done
    return lags


def wait_all_committing(settings: ColstreamSettings, timeout_s: float) -> None:
    """Until every stage has committed something: they are up, in their groups, and working."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done: dict[str, int] = {}
        group_lag(settings, done)
        if len(done) == 3 and all(v > 0 for v in done.values()):
            return
        time.sleep(0.5)
    raise AssertionError(f"stages did not start committing within {timeout_s:.0f}s")


def wait_drained(settings: ColstreamSettings, timeout_s: float, stable_s: float = 3.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    zero_since: float | None = None
    lags: dict[str, int] = {}
    while time.monotonic() < deadline:
        lags = group_lag(settings)
        if all(v == 0 for v in lags.values()):
            zero_since = zero_since or time.monotonic()
            if time.monotonic() - zero_since >= stable_s:
                return lags
        else:
            zero_since = None
        time.sleep(0.5)
    raise AssertionError(f"pipeline did not drain within {timeout_s:.0f}s: lag {lags}")


def wipe(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
