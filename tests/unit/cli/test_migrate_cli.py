"""`colstream migrate`: one clear line when no `run all` answers, and the status summary."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from colstream.cli.migrate import MigrateError, call_api, summary
from colstream.infra.settings import ColstreamSettings


def test_without_a_running_api_the_command_says_where_the_migration_runs(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    settings = ColstreamSettings().updated(state_dir=tmp_path, api={"public_url": f"http://127.0.0.1:{port}"})
    with pytest.raises(MigrateError) as refused:
        call_api(settings, "GET", "", timeout_s=5)
    assert "colstream run all" in str(refused.value) and "docs/operations.md" in str(refused.value)


def test_the_summary_shows_documents_and_pages_done_of_total() -> None:
    status = {
        "migration_id": "m1", "phase": "backfilling", "serving": "src",
        "source": {"name": "src", "model": {"model_id": "old"}},
        "target": {"name": "dst", "model": {"model_id": "new"}},
        "documents": {"done": 3, "total": 5}, "pages": {"done": 9, "total": 14}, "complete": False,
        "pending": ["b", "c"],
    }
    text = summary(status)
    assert "3/5 documents, 9/14 pages" in text and "in progress" in text and "waiting for: b, c" in text


def test_the_cluster_steps_and_the_backfill_need_a_qdrant_server(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from colstream.cli.main import app

    monkeypatch.setenv("COLSTREAM_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("QDRANT_URL", raising=False)
    monkeypatch.delenv("COLSTREAM_QDRANT__URL", raising=False)
    runner = CliRunner()
    step = runner.invoke(app, ["migrate", "status", "--cluster"])
    assert step.exit_code != 0 and "--cluster needs a Qdrant server" in step.output
    backfill = runner.invoke(app, ["migrate", "backfill"])
    assert backfill.exit_code != 0 and "needs a Qdrant server" in backfill.output
    unknown = runner.invoke(app, ["migrate", "backfill", "--stage", "webhooks"])
    assert unknown.exit_code != 0 and "not webhooks" in unknown.output


def test_a_cluster_step_says_in_one_line_what_is_wrong_with_its_input_or_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from colstream.cli.main import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("COLSTREAM_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("QDRANT_URL", f"http://127.0.0.1:{port}")
    runner = CliRunner()
    bad_family = runner.invoke(app, ["migrate", "start", "--cluster", "--family", "nope"])
    assert bad_family.exit_code != 0 and "invalid: family" in bad_family.output
    assert "Traceback" not in bad_family.output
    unreachable = runner.invoke(app, ["migrate", "status", "--cluster"])
    assert unreachable.exit_code != 0 and f"127.0.0.1:{port} did not answer" in unreachable.output
