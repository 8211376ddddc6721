"""The retention sweeper ships as a CronJob running `colstream gc`, allowed to reach Qdrant."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUSTOMIZE = REPO / ".colstream" / "tools" / "bin" / "kustomize"


@pytest.mark.skipif(not KUSTOMIZE.exists() and not shutil.which("kustomize"),
                    reason="kustomize not installed (scripts/check-deploy.sh installs it)")
@pytest.mark.parametrize("kustomization", ["k8s/base", "k8s/overlays/aks"])
def test_the_gc_cronjob_runs_the_sweeper_and_may_reach_qdrant(kustomization: str) -> None:
    binary = str(KUSTOMIZE) if KUSTOMIZE.exists() else "kustomize"
    rendered = subprocess.run([binary, "build", str(REPO / kustomization)], check=True, capture_output=True,
                              text=True, timeout=120).stdout
    documents: list[dict[str, Any]] = [d for d in yaml.safe_load_all(rendered) if d]
    (cron,) = [d for d in documents if d["kind"] == "CronJob" and d["metadata"]["name"] == "colstream-gc"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["args"] == ["gc"] and cron["spec"]["concurrencyPolicy"] == "Forbid"
    name = pod["metadata"]["labels"]["app.kubernetes.io/name"]
    policies = {d["metadata"]["name"]: d for d in documents if d["kind"] == "NetworkPolicy"}
    to_qdrant = policies["colstream-to-qdrant"]
    assert name in to_qdrant["spec"]["podSelector"]["matchExpressions"][0]["values"]
    if kustomization.endswith("aks"):
        assert pod["metadata"]["labels"]["azure.workload.identity/use"] == "true"
