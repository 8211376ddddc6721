"""Policy for rendered manifests: what every colstream workload must declare.

Each Deployment, StatefulSet and Job (and its containers) must have resource requests
and limits, run as non-root with a read-only root filesystem, drop every capability,
and use an image pinned by a tag other than ``latest`` (or by digest). Long-running
containers (Deployments, StatefulSets) also need liveness and readiness probes, each
with an explicit ``timeoutSeconds``.

    python deploy/tools/policy.py rendered.yaml [more.yaml ...]   # exit 1 on a violation
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "CronJob", "DaemonSet"}
LONG_RUNNING = {"Deployment", "StatefulSet", "DaemonSet"}


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj.get("spec") or {}
    if obj["kind"] == "CronJob":
        spec = (spec.get("jobTemplate") or {}).get("spec") or {}
    return ((spec.get("template") or {}).get("spec")) or {}


def image_violation(image: str) -> str | None:
    if "@sha256:" in image:
        return None
    name = image.rsplit("/", 1)[-1]
    if ":" not in name:
        return f"image {image!r} has no tag (pin a tag or a digest)"
    if name.rsplit(":", 1)[1] == "latest" or name.rsplit(":", 1)[1].startswith("latest-"):
        return f"image {image!r} uses a 'latest' tag"
    return None


def violations(obj: dict[str, Any]) -> Iterator[str]:
    kind = obj.get("kind")
    if kind not in WORKLOAD_KINDS:
        return
    where = f"{kind}/{(obj.get('metadata') or {}).get('name', '?')}"
    spec = pod_spec(obj)
    pod_security = spec.get("securityContext") or {}
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        name = f"{where} container {container.get('name', '?')}"
        security = container.get("securityContext") or {}
        if security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is not True:
            yield f"{name}: runAsNonRoot is not true"
        if security.get("readOnlyRootFilesystem") is not True:
            yield f"{name}: readOnlyRootFilesystem is not true"
        if security.get("allowPrivilegeEscalation") is not False:
            yield f"{name}: allowPrivilegeEscalation is not false"
        if "ALL" not in ((security.get("capabilities") or {}).get("drop") or []):
            yield f"{name}: capabilities do not drop ALL"
        resources = container.get("resources") or {}
        for part in ("requests", "limits"):
            for resource in ("cpu", "memory") if part == "requests" else ("memory",):
                if resource not in (resources.get(part) or {}):
                    yield f"{name}: no {part}.{resource}"
        problem = image_violation(str(container.get("image", "")))
        if problem:
            yield f"{name}: {problem}"
        if kind in LONG_RUNNING and container in (spec.get("containers") or []):
            for probe in ("livenessProbe", "readinessProbe"):
                if probe not in container:
                    yield f"{name}: no {probe}"
                elif "timeoutSeconds" not in container[probe]:
                    yield f"{name}: {probe} has no explicit timeoutSeconds"


def check(documents: Iterable[Any]) -> list[str]:
    found: list[str] = []
    for obj in documents:
        if isinstance(obj, dict) and "kind" in obj:
            found.extend(violations(obj))
    return found


def main(paths: list[str]) -> int:
    found: list[str] = []
    for path in paths:
        found.extend(f"{path}: {v}" for v in check(yaml.safe_load_all(Path(path).read_text())))
    for line in found:
        print(line)
    print(f"policy: {len(found)} violation(s) in {len(paths)} file(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
