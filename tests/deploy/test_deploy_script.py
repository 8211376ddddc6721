"""deploy/azure/deploy-to-azure.sh against stub az, helm, kubectl and openssl that record their calls."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "azure" / "deploy-to-azure.sh"
TOOLS = ("az", "helm", "kubectl", "openssl")
# Reads that never change anything; every other call counts as mutating.
READ_ONLY = re.compile(
    r"^(az (account show|\S+ show|\S+ \S+ show|\S+ \S+ \S+ show|acr manifest show-metadata|role assignment list)"
    r"|kubectl (get|wait|rollout status|create secret \S+ \S+ .*--dry-run=client)"
    r"|openssl rand)"
)

STUB = """#!/usr/bin/env bash
printf '%s' "$(basename "$0")" >> "$CALL_LOG"
printf ' %q' "$@" >> "$CALL_LOG"
printf '\\n' >> "$CALL_LOG"
case "$(basename "$0") $*" in
  "kubectl get secret"*) printf 'c3RvcmVk' ;;   # base64 of an existing value
  "openssl rand"*) echo generated ;;
  *" -o tsv"*|*" --query "*) echo stub-value ;;
esac
"""


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        path = bin_dir / tool
        path.write_text(STUB)
        path.chmod(0o755)
    return bin_dir


def run_script(stubs: Path, log: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(stubs.parent),
        "CALL_LOG": str(log),
        "LETSENCRYPT_EMAIL": "ops@example.com",
        "IMAGE_TAG": "v1",
        **env,
    }
    log.touch()
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=environment, capture_output=True, text=True, timeout=120, check=False
    )


def calls(log: Path) -> list[str]:
    # Temporary paths differ between runs; the calls themselves must not.
    text = re.sub(r"/tmp/tmp\.\w+", "<tmp>", log.read_text())
    text = re.sub(r"\.deploy-\d+", ".deploy-<pid>", text)
    return text.splitlines()


def test_help_makes_no_calls(stubs: Path, tmp_path: Path) -> None:
    for flag in ("--help", "-h"):
        result = run_script(stubs, tmp_path / "calls.log", flag)
        assert result.returncode == 0, result.stderr
        assert "--dry-run" in result.stdout
    assert calls(tmp_path / "calls.log") == []


def test_unknown_flags_are_errors_and_make_no_calls(stubs: Path, tmp_path: Path) -> None:
    result = run_script(stubs, tmp_path / "calls.log", "--dryrun")
    assert result.returncode == 2
    assert "unknown argument --dryrun" in result.stderr
    assert calls(tmp_path / "calls.log") == []


def test_dry_run_prints_every_command_and_runs_none(stubs: Path, tmp_path: Path) -> None:
    result = run_script(stubs, tmp_path / "calls.log", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path / "calls.log") == []
    printed = result.stdout + result.stderr
    for expected in ("+ az aks create", "+ helm upgrade --install gpu-operator", "+ az acr build",
                     "+ kubectl apply --server-side", "+ kubectl -n colstream delete job colstream-topics",
                     "+ az eventgrid system-topic event-subscription create"):
        assert expected in printed, expected


def test_a_full_run_pins_every_chart_and_operator_version(stubs: Path, tmp_path: Path) -> None:
    result = run_script(stubs, tmp_path / "calls.log")
    assert result.returncode == 0, result.stderr
    helm_installs = [c for c in calls(tmp_path / "calls.log") if c.startswith("helm upgrade --install")]
    assert len(helm_installs) == 3, helm_installs
    for call in helm_installs:
        assert re.search(r" --version v?\d+\.\d+\.\d+", call), call
    assert not any("ingress-nginx" in c for c in calls(tmp_path / "calls.log"))


def test_two_full_runs_make_the_same_calls(stubs: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    assert run_script(stubs, first).returncode == 0
    assert run_script(stubs, second).returncode == 0
    assert calls(first) == calls(second)
    assert len(calls(first)) > 30
    # The immutable topics Job is removed before every apply, so a re-run never fails on it.
    apply_at = next(i for i, c in enumerate(calls(first)) if c.startswith("kubectl apply --server-side"))
    assert any("delete job colstream-topics" in c for c in calls(first)[:apply_at])


def test_the_generated_layer_pins_images_by_tag_and_digest(stubs: Path, tmp_path: Path) -> None:
    # The layer is removed at exit; keep a copy through a kubectl stub that reads it.
    kubectl = stubs / "kubectl"
    keep_layer = 'for a in "$@"; do [[ -f "$a/kustomization.yaml" ]] && cp "$a/kustomization.yaml" "$CALL_LOG.l"; done'
    kubectl.write_text(STUB.replace("case", keep_layer + "\ncase", 1))
    assert run_script(stubs, tmp_path / "calls.log").returncode == 0
    layer = (tmp_path / "calls.log.l").read_text()
    for name in ("colstream", "colstream-gpu", "qdrant/qdrant"):
        pinned = rf"name: {re.escape(name)}, newName: \S+, newTag: \"[^\"]+\", digest: \"stub-value\""
        assert re.search(pinned, layer), name
    assert "latest" not in layer


def test_mutating_calls_are_all_in_the_full_run_only(stubs: Path, tmp_path: Path) -> None:
    assert run_script(stubs, tmp_path / "full.log").returncode == 0
    mutating = [c for c in calls(tmp_path / "full.log") if not READ_ONLY.match(c)]
    assert any(c.startswith("kubectl apply") for c in mutating)
    assert any(c.startswith("helm upgrade") for c in mutating)
    assert run_script(stubs, tmp_path / "dry.log", "--dry-run").returncode == 0
    assert [c for c in calls(tmp_path / "dry.log") if not READ_ONLY.match(c)] == []
