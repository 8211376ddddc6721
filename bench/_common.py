"""What every benchmark shares: a broker, isolated settings, documents, and honest summaries.

Every figure is printed with its baseline, measured in the same run on the same cores and
the same documents, and repeated: the machine is shared, so min and median are reported and
the ratio is taken from medians (and pair by pair where runs alternate).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    # bench scripts run as files; the tests' document generators live in the repository.
    sys.path.insert(0, str(REPO))

from colstream.infra.settings import ColstreamSettings  # noqa: E402

STATE = REPO / ".colstream" / "bench"
# Benchmarks import this module first thing: the wall time in a report covers the whole run.
_STARTED = time.time()


# -- broker and settings -----------------------------------------------------------------------


def bootstrap_servers() -> str:
    """KAFKA_BOOTSTRAP_SERVERS when set, else the local KRaft broker (reused if one answers on :9092)."""
    explicit = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if explicit:
        return explicit
    from colstream.infra.local_kafka import LocalKafka

    return LocalKafka(state_dir=STATE).start()


def bench_settings(tag: str, bootstrap: str, *, partitions: int = 3, create_topics: bool = True) -> ColstreamSettings:
    """Shipped defaults (linger, batch sizes, model settings) with a private topic set, groups and state dir."""
    run = f"{tag}-{uuid.uuid4().hex[:6]}"
    state = STATE / "runs" / run
    (state / "blobs").mkdir(parents=True, exist_ok=True)
    settings = ColstreamSettings().updated(
        state_dir=state,
        kafka={"bootstrap_servers": bootstrap},
        consumer_group_prefix=f"b{run}-",
        topics={**{name: f"bench.{run}.{name}" for name in ("uploads", "pages", "vectors", "indexed", "dlq")},
                "partitions": partitions},
        blob={"local_root": state / "blobs"},
        qdrant={"path": state / "qdrant", "url": None},
    )
    if create_topics:
        from colstream.infra.kafka import ensure_topics

        ensure_topics(settings)
    return settings


def drop_topics(settings: ColstreamSettings) -> None:
    """Benchmarks write hundreds of MB; give the broker its disk back (best effort)."""
    from colstream.infra.kafka import admin_client

    admin = admin_client(settings)  # must outlive its futures
    with contextlib.suppress(Exception):
        futures = admin.delete_topics(settings.topics.all_names(), operation_timeout=30)
        for future in futures.values():
            # A topic that was never created is fine.
            with contextlib.suppress(Exception):
                future.result(timeout=30)


# -- documents -----------------------------------------------------------------------------------


_LOREM = (
    "Quarterly revenue grew in every region while operating costs stayed flat; the board approved "
    "the dividend and a new buyback programme. Table 3 lists the segment results by product line."
)


def text_page_pdf(pages: int, seed: int = 0) -> bytes:
    """A report-like PDF: a title, shapes and ~45 lines of body text per page.

    Denser than the test fixtures' pages, so render and JPEG costs look like real documents.
    """
    from tests.fixtures.docs import PageSpec, make_pdf_from_specs

    specs = []
    for n in range(1, pages + 1):
        lines = []
        for line in range(45):
            words = _LOREM.split()
            shift = (seed * 7 + n * 3 + line) % len(words)
            text = " ".join(words[shift:] + words[:shift])[:95]
            text = text.replace("\\", "").replace("(", "").replace(")", "")
            lines.append(b"BT /F1 9 Tf 50 %d Td (%s) Tj ET\n" % (540 - line * 11, text.encode("latin-1")))
        specs.append(PageSpec(text=f"Report {seed} page {n}", extra_ops=b"".join(lines)))
    return make_pdf_from_specs(specs)


def write_blob(settings: ColstreamSettings, name: str, data: bytes) -> str:
    path = settings.blob.local_root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path.resolve().as_uri()


# -- figures -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    runs: int
    min: float
    median: float
    max: float

    def __str__(self) -> str:
        return f"{self.median:.4g} (min {self.min:.4g}, max {self.max:.4g}, n={self.runs})"


def spread(values: Sequence[float]) -> Spread:
    return Spread(len(values), min(values), statistics.median(values), max(values))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): with 30 samples p99 is the worst one."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


@dataclass
class Row:
    figure: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    goal: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0):
            return None
        return self.value / self.baseline


@dataclass
class Report:
    name: str
    command: str
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    started: float = _STARTED

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def print_and_save(self) -> Path:
        print()
        print(f"== {self.name}: {self.command}")
        print(f"   machine: {machine()}")
        for row in self.rows:
            ratio = f"{row.ratio:.3f}" if row.ratio is not None else "-"
            base = f"{row.baseline:.4g} {row.unit} ({row.baseline_name})" if row.baseline is not None else "-"
            met = {True: "MET", False: "MISSED", None: ""}[row.met]
            print(f"   {row.figure}: {row.value:.4g} {row.unit} | baseline {base} | ratio {ratio} "
                  f"| goal {row.goal or '-'} {met} {row.note}")
        STATE.mkdir(parents=True, exist_ok=True)
        path = STATE / f"{self.name}.json"
        data = {
            "name": self.name,
            "command": self.command,
            "machine": machine(),
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "wall_s": round(time.time() - self.started, 1),
            "rows": [{**asdict(r), "ratio": r.ratio} for r in self.rows],
            "details": self.details,
        }
        path.write_text(json.dumps(data, indent=2, default=str))
        print(f"   saved {path.relative_to(REPO)}")
        return path


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()
    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
            f"load avg {load[0]:.2f}/{load[1]:.2f}, CPU only (no GPU used)")


def alternate(
    repeats: int, first: Callable[[], float], second: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """Run A B A B ...: a drift in machine speed then hits both sides alike."""
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeats):
        a.append(first())
        b.append(second())
    return a, b


def pairwise_ratios(a: Sequence[float], b: Sequence[float]) -> Spread:
    return spread([x / y for x, y in zip(a, b, strict=True)])


def dir_bytes(path: Path) -> int:
    """Bytes actually allocated on disk under ``path`` (sparse and preallocated files count as used)."""
    total = 0
    for item in path.rglob("*"):
        try:
            if item.is_file():
                total += item.stat().st_blocks * 512
        except OSError:
            pass
    return total


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
