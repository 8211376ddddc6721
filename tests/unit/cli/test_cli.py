"""The typer CLI: help never starts anything, every option has help, clean output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import typer

from colstream import __version__
from colstream.cli import main as cli
from colstream.cli.publish import folder_document_id, folder_files
from colstream.infra.local_kafka import LocalKafka
from colstream.schemas.ids import is_valid_document_id

REPO = Path(__file__).resolve().parents[3]


def _walk(command: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = [(path, command)]
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            found.extend(_walk(sub, (*path, name)))
    return found


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"colstream {__version__}"


def test_every_command_and_option_has_help() -> None:
    root = typer.main.get_command(cli.app)
    missing = []
    for path, command in _walk(root):
        if path and not (command.help or command.short_help):
            missing.append(" ".join(path))
        for param in command.params:
            if param.param_type_name == "option" and not param.help:
                missing.append(f"{' '.join(path)} {param.opts[0]}")
            if param.param_type_name == "argument" and not getattr(param, "help", None):
                missing.append(f"{' '.join(path)} <{param.name}>")
    assert missing == []


def test_existing_commands_are_kept() -> None:
    root = typer.main.get_command(cli.app)
    names = {" ".join(path) for path, _ in _walk(root)}
    for expected in ("kafka start", "kafka stop", "kafka status", "kafka tool", "topics", "publish upload",
                     "publish delete", "run splitter", "run embedder", "run sink", "run api", "run all",
                     "documents", "models", "demo", "dlq list", "dlq redrive", "replay", "doctor"):
        assert expected in names


@pytest.mark.parametrize("args", [["kafka", "start", "--help"], ["kafka", "status", "--help"],
                                  ["kafka", "stop", "--help"], ["run", "all", "--help"], ["run", "splitter", "-h"],
                                  ["demo", "--help"], ["dlq", "redrive", "--help"]])
def test_help_never_starts_anything(args: list[str], monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("--help started something")

    for name in ("start", "stop", "status"):
        monkeypatch.setattr(LocalKafka, name, forbidden)
    monkeypatch.setattr(cli, "run_all", forbidden)
    monkeypatch.setattr(cli, "run_stage", forbidden)
    assert cli.main(args) == 0
    assert "Usage" in capsys.readouterr().out


def test_kafka_tool_help_and_arguments_pass_through(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[list[str]] = []
    def call(cmd: list[str]) -> int:
        calls.append(cmd)
        return 0

    monkeypatch.setattr(subprocess, "call", call)
    assert cli.main(["kafka", "tool", "--help"]) == 0
    assert "usage: colstream kafka tool TOOL" in capsys.readouterr().out
    assert calls == []
    assert cli.main(["kafka", "tool", "kafka-consumer-groups", "--bootstrap-server", "b:1", "--group", "g",
                     "--reset-offsets", "--to-earliest", "--execute"]) == 0
    (cmd,) = calls
    assert cmd[-7:] == ["--bootstrap-server", "b:1", "--group", "g", "--reset-offsets", "--to-earliest",
                        "--execute"]
    assert cmd[-8].endswith("ConsumerGroupCommand")


@pytest.mark.slow  # a colstream child process
def test_kafka_start_help_leaves_no_broker_running(tmp_path: Path) -> None:
    env = {**os.environ, "COLSTREAM_STATE_DIR": str(tmp_path)}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    proc = subprocess.run([sys.executable, "-m", "colstream", "kafka", "start", "--help"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout
    assert not (tmp_path / "kafka").exists()  # no config written, no pid file, no broker


def test_unknown_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["documents", "--no-such-option"]) == 2
    assert "No such option" in capsys.readouterr().err


def test_folder_ids_follow_the_id_rule(tmp_path: Path) -> None:
    for rel in ("a.pdf", "sub dir/b report.pdf", "sub dir/deeper/.hidden.pdf", "sub dir/deeper/c.PDF",
                "_odd/x.png", ".git/config"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"%PDF-1.4")
    files = folder_files(tmp_path, "*")
    assert [p.relative_to(tmp_path).as_posix() for p in files] == [
        "_odd/x.png", "a.pdf", "sub dir/b report.pdf", "sub dir/deeper/c.PDF"]
    ids = [folder_document_id(tmp_path, p, None) for p in files]
    assert ids == ["f_odd/x.png", "a.pdf", "sub-dir/b-report.pdf", "sub-dir/deeper/c.PDF"]
    assert all(is_valid_document_id(i) for i in ids)
    assert folder_document_id(tmp_path, files[1], "batch-7/") == "batch-7/a.pdf"
    assert [p.name for p in folder_files(tmp_path, "*.pdf")] == ["a.pdf", "b report.pdf"]


@pytest.mark.slow  # two colstream child processes
def test_documents_prints_no_library_chatter(tmp_path: Path) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps([]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "COLSTREAM_STATE_DIR": str(tmp_path),
               "COLSTREAM_API__PUBLIC_URL": f"http://127.0.0.1:{server.server_port}"}
        proc = subprocess.run([sys.executable, "-m", "colstream", "documents"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().endswith("0 documents")
        assert proc.stderr == ""
        verbose = subprocess.run([sys.executable, "-m", "colstream", "-v", "documents"], env=env, cwd=REPO,
                                 capture_output=True, text=True, timeout=60, check=False)
        assert "HTTP Request" in verbose.stderr  # -v brings httpx's lines back
    finally:
        server.shutdown()
