"""docs/capacity.md holds exactly what scripts/capacity.py prints, and the arithmetic scales."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def _capacity() -> ModuleType:
    spec = importlib.util.spec_from_file_location("capacity", REPO / "scripts" / "capacity.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["capacity"] = module
    spec.loader.exec_module(module)
    return module


def test_the_document_matches_the_script() -> None:
    capacity = _capacity()
    assert capacity.generated_block(capacity.DOC) == capacity.tables(10e6, 1e9), (
        "docs/capacity.md is out of date: run `python scripts/capacity.py --write`"
    )


def _gpus_at_peak(block: str, gpu: str) -> int:
    row = next(line for line in block.splitlines() if line.startswith(f"| {gpu}"))
    return int(row.split("|")[5])


def test_gpus_scale_with_the_load_and_estimates_are_marked() -> None:
    capacity = _capacity()
    small, large = capacity.tables(1e6, 1e8), capacity.tables(10e6, 1e9)
    # Ceilings round small counts up, so compare on the GPU with the most of them.
    assert _gpus_at_peak(large, "T4") >= 9 * _gpus_at_peak(small, "T4")
    # No GPU figure is measured yet: every GPU row says it is an estimate.
    assert all("estimate" in line for line in large.splitlines() if line.startswith("| T4") or "H100" in line)


def test_qdrant_nodes_follow_the_scarcer_of_ram_and_disk() -> None:
    capacity = _capacity()
    block = capacity.tables(10e6, 1e9)
    rows = {line.split("|")[1].strip(): line.split("|") for line in block.splitlines() if "KiB" not in line
            and line.startswith("| ") and "`" in line}
    default = rows["float16, every token (default)"]
    binary = rows["binary quantized in RAM, float16 on disk"]
    assert int(default[7]) > int(binary[7])  # RAM-bound vs disk-bound
    assert re.fullmatch(r"\s*\d+\s*", default[8])  # shard_number is a whole number
