"""deploy/tools/policy.py: the rules fail on bad workloads and pass on every shipped kustomization."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy" / "tools"))
import policy  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
KUSTOMIZE = REPO / ".colstream" / "tools" / "bin" / "kustomize"
GOOD: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "good"},
    "spec": {"template": {"spec": {
        "securityContext": {"runAsNonRoot": True},
        "containers": [{
            "name": "app",
            "image": "registry.example.com/app:1.2.3",
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
            "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]}},
            "livenessProbe": {"httpGet": {"path": "/livez", "port": 9400}, "timeoutSeconds": 2},
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": 9400}, "timeoutSeconds": 2},
        }],
    }}},
}


def test_a_compliant_deployment_passes() -> None:
    assert policy.check([GOOD]) == []


def test_the_bad_fixture_fails_on_every_rule() -> None:
    found = policy.check(yaml.safe_load_all((FIXTURES / "bad-deployment.yaml").read_text()))
    text = "\n".join(found)
    for rule in ("runAsNonRoot", "readOnlyRootFilesystem", "allowPrivilegeEscalation", "drop ALL",
                 "no requests.cpu", "no requests.memory", "no limits.memory", "'latest' tag",
                 "no livenessProbe", "no readinessProbe"):
        assert rule in text, rule
    assert policy.main([str(FIXTURES / "bad-deployment.yaml")]) == 1


def container(obj: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = obj["spec"]["template"]["spec"]["containers"][0]
    return result


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda c: c.pop("livenessProbe"), "no livenessProbe"),
        (lambda c: c["readinessProbe"].pop("timeoutSeconds"), "readinessProbe has no explicit timeoutSeconds"),
        (lambda c: c["resources"]["requests"].pop("cpu"), "no requests.cpu"),
        (lambda c: c["resources"].pop("limits"), "no limits.memory"),
        (lambda c: c["securityContext"].update(readOnlyRootFilesystem=False), "readOnlyRootFilesystem"),
        (lambda c: c["securityContext"].update(runAsNonRoot=False), "runAsNonRoot"),
        (lambda c: c.update(image="app"), "has no tag"),
        (lambda c: c.update(image="registry.example.com:5000/app:latest"), "'latest' tag"),
    ],
)
def test_each_rule_fails_alone(break_it: Any, message: str) -> None:
    bad = copy.deepcopy(GOOD)
    break_it(container(bad))
    found = policy.check([bad])
    assert len(found) == 1 and message in found[0], found


def test_a_digest_pins_an_image() -> None:
    pinned = copy.deepcopy(GOOD)
    container(pinned)["image"] = "registry.example.com/app@sha256:" + "a" * 64
    assert policy.check([pinned]) == []


@pytest.mark.skipif(not KUSTOMIZE.exists() and not shutil.which("kustomize"),
                    reason="kustomize not installed (scripts/check-deploy.sh installs it)")
@pytest.mark.parametrize("kustomization",
                         ["k8s/base", "k8s/overlays/int8", "k8s/overlays/aks", "k8s/overlays/migration", "strimzi"])
def test_every_shipped_kustomization_passes(kustomization: str) -> None:
    binary = str(KUSTOMIZE) if KUSTOMIZE.exists() else "kustomize"
    rendered = subprocess.run([binary, "build", str(REPO / kustomization)], check=True, capture_output=True,
                              text=True, timeout=120).stdout
    documents = list(yaml.safe_load_all(rendered))
    assert policy.check(documents) == []
    if kustomization.startswith("k8s"):
        kinds = {d["kind"] for d in documents}
        assert {"Deployment", "NetworkPolicy", "StatefulSet", "Job"} <= kinds
        deployments = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Deployment"}
        for stage in ("splitter", "embedder", "sink", "webhooks"):
            env = {e["name"]: e for e in container(deployments[f"colstream-{stage}"])["env"]}
            assert env["COLSTREAM_KAFKA__GROUP_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert any(d["kind"] == "NetworkPolicy" and d["spec"]["podSelector"] == {}
                   and set(d["spec"]["policyTypes"]) == {"Ingress", "Egress"} and "ingress" not in d["spec"]
                   for d in documents), "no default-deny NetworkPolicy"
