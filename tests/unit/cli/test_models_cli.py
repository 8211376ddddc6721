"""``colstream models list`` and ``colstream models build-tiny``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from colstream.cli import main as cli
from colstream.embedding.families import FAMILIES
from colstream.embedding.tiny import MARKER_FILE, README_FILE

REPO = Path(__file__).resolve().parents[3]
MODEL_CACHE = REPO / ".colstream" / "models"


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COLSTREAM_STATE_DIR", str(tmp_path))
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    (tmp_path / "models").symlink_to(MODEL_CACHE)  # reuse the tiny checkpoints other tests built
    return tmp_path


def test_models_list_prints_every_family_default_and_dim(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name, spec in FAMILIES.items():
        assert name in out and spec.default_model_id in out
    assert "320 (published)" in out  # tomoro colqwen3
    assert "RANDOM WEIGHTS" in out


def test_models_list_json_reads_tiny_dims_from_the_checkpoints(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["models", "list", "--json", "--tiny"]) == 0
    rows = {row["family"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(FAMILIES)
    assert rows["colpali"]["default"] == "vidore/colpali-v1.2"
    assert "vidore/colpali-v1.3" in rows["colpali"]["checkpoints"]
    assert rows["colqwen3"]["dim"] == 320 and rows["colqwen3"]["dim_source"] == "published"
    # Read from each tiny checkpoint's safetensors headers, not from the table above.
    assert {name: row["tiny_dim"] for name, row in rows.items()} == {
        name: (320 if name == "colqwen3" else 128) for name in FAMILIES
    }


@pytest.mark.slow  # builds a checkpoint from scratch in a child process
def test_models_build_tiny_keeps_its_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "smol"
    assert cli.main(["models", "build-tiny", "--out", str(out), "--family", "colidefics3"]) == 0
    assert "RANDOM WEIGHTS" in capsys.readouterr().out
    assert json.loads((out / MARKER_FILE).read_text())["family"] == "colidefics3"
    assert "RANDOM WEIGHTS" in (out / README_FILE).read_text()
    assert cli.main(["models", "build-tiny", "--out", str(out), "--family", "colbert"]) != 0
