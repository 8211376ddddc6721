"""End to end, this checkout against another one (A/B), on the same broker and cores.

    .venv/bin/python bench/pipeline_ab.py --baseline /tmp/ab-base [--pairs 3] [--runs 3]

Runs only the end-to-end phase of ``bench/pipeline.py`` (20 PDFs x 20 pages, the three stages
in threads of one process, the clock from the splitter's assignment to the sink's last commit),
``--runs`` times per side, in a child process per side whose imports come from that side's tree:
its own ``colstream`` package and its own ``bench/pipeline.py``. The sides alternate, and the
one that goes first alternates from pair to pair, so drift in the machine's speed falls on both.
The figure is the median of the pairwise ratios (this checkout / baseline); the whole bench
swings by 15-20% between runs on a shared 2-core machine, which a single pair cannot separate.

The baseline is any checkout with ``bench/pipeline.py``: ``git worktree add /tmp/ab-base <commit>``.
A checkout from before ``colstream/`` held its sub-packages as links needs them made once:
``cd /tmp/ab-base && for p in schemas producers consumers infra embedding api cli; do
ln -s ../$p colstream/$p; done``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DOCS, PAGES = 20, 20


def run_side(tree: Path, runs: int) -> list[float]:
    """One child process whose imports resolve to ``tree``; returns its end-to-end pages/s."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(tree), "--runs", str(runs)],
        cwd=tree, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"{tree}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rates: list[float] = json.loads(results[-1].removeprefix("RESULT "))
    return rates


def child(tree: Path, runs: int) -> None:
    # Python put this file's folder first on sys.path; the side's own bench folder goes there
    # instead, so ``_common`` and ``pipeline`` are the tree's.
    sys.path[:] = [str(tree / "bench"), str(tree), *(p for p in sys.path[1:] if p != str(HERE))]
    import colstream

    if not Path(colstream.__file__).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"colstream imports from {colstream.__file__}, not from {tree}")
    import _common
    import pipeline

    from colstream.embedding.tiny import ensure_tiny_checkpoint

    bootstrap = _common.bootstrap_servers()
    model_path = ensure_tiny_checkpoint("colqwen2", _common.STATE / "models")
    used: list[Any] = []
    rates: list[float] = []
    try:
        for _ in range(runs):
            settings = _common.bench_settings("ab", bootstrap)
            if hasattr(settings, "updated"):  # frozen settings derive a copy
                settings = settings.updated(model={"name_or_path": str(model_path)})
            else:  # older checkouts mutate
                settings.model.name_or_path = str(model_path)
            used.append(settings)
            corpus = pipeline.make_corpus(settings, DOCS, PAGES)
            rates.append(pipeline.end_to_end(settings, corpus, DOCS * PAGES, 600.0)["pages_per_s"])
    finally:
        for settings in used:
            _common.drop_topics(settings)
    print("RESULT " + json.dumps(rates), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="the other checkout")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3, help="end-to-end runs per side and pair")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.runs)
        return
    if args.baseline is None or not (args.baseline / "bench" / "pipeline.py").exists():
        parser.error("--baseline must name a checkout with bench/pipeline.py")

    import _common
    from _common import Report, Row, log

    candidate = HERE.parent
    ratios: list[float] = []
    medians: dict[str, list[float]] = {"candidate": [], "baseline": []}
    for pair in range(args.pairs):
        order = [("baseline", args.baseline), ("candidate", candidate)]
        if pair % 2:
            order.reverse()
        got: dict[str, float] = {}
        for side, tree in order:
            rates = run_side(tree, args.runs)
            got[side] = statistics.median(rates)
            medians[side].append(got[side])
            log(f"pair {pair + 1} {side}: {got[side]:.1f} pages/s (runs {', '.join(f'{r:.1f}' for r in rates)})")
        ratios.append(got["candidate"] / got["baseline"])
    spread = _common.spread(ratios)
    report = Report("pipeline_ab", f"python bench/pipeline_ab.py --baseline {args.baseline} --pairs {args.pairs}")
    report.add(Row("end to end, this checkout / baseline (median of pairwise ratios)", spread.median, "x",
                   note=f"pairs {', '.join(f'{r:.2f}' for r in ratios)}; candidate medians "
                        f"{', '.join(f'{r:.1f}' for r in medians['candidate'])} pages/s; baseline "
                        f"{', '.join(f'{r:.1f}' for r in medians['baseline'])} pages/s"))
    report.details = {"ratios": ratios, "medians": medians, "baseline": str(args.baseline)}
    report.print_and_save()


if __name__ == "__main__":
    main()
