"""The migration's Jobs ship as suspended CronJob templates that run `colstream migrate --cluster`,
under a Kafka identity whose ACLs cover exactly the topics and groups the backfill derives."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from colstream.infra.settings import ColstreamSettings
from colstream.infra.vectorstore import IndexModel
from colstream.migration.core import IndexRef, backfill_groups, backfill_topics, plan_start

REPO = Path(__file__).resolve().parents[2]
KUSTOMIZE = REPO / ".colstream" / "tools" / "bin" / "kustomize"


def rendered(kustomization: str) -> list[dict[str, Any]]:
    binary = str(KUSTOMIZE) if KUSTOMIZE.exists() else "kustomize"
    out = subprocess.run([binary, "build", str(REPO / kustomization)], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.skipif(not KUSTOMIZE.exists() and not shutil.which("kustomize"),
                    reason="kustomize not installed (scripts/check-deploy.sh installs it)")
def test_every_step_is_a_suspended_template_of_the_migrate_command_that_may_reach_kafka_and_qdrant() -> None:
    documents = rendered("k8s/overlays/migration")
    crons = {d["metadata"]["name"]: d for d in documents if d["kind"] == "CronJob" and "migrate" in
             d["metadata"]["name"]}
    assert set(crons) == {f"colstream-migrate-{s}" for s in
                          ("start", "status", "cutover", "finish", "abort", "backfill-cpu", "backfill-gpu")}
    configmaps = {d["metadata"]["name"] for d in documents if d["kind"] == "ConfigMap"}
    for name, cron in crons.items():
        assert cron["spec"]["suspend"] is True, name
        pod = cron["spec"]["jobTemplate"]["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        args = container["args"]
        assert args[0] == "migrate" and ("--cluster" in args or args[1] == "backfill"), name
        env = {e["name"]: e for e in container["env"]}
        assert env["COLSTREAM_KAFKA__SASL_USERNAME"]["value"] == "colstream-migrate"
        assert "QDRANT_API_KEY" in env
        for source in container["envFrom"]:
            if "configMapRef" in source:  # every ConfigMap it reads exists under that (hashed) name
                assert source["configMapRef"]["name"] in configmaps, (name, source)
        assert ":" in container["image"], name  # pinned like the Deployments
    gpu = crons["colstream-migrate-backfill-gpu"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert gpu["containers"][0]["args"] == ["migrate", "backfill", "--stage", "embedder"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    cpu = crons["colstream-migrate-backfill-cpu"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert cpu["containers"][0]["args"] == ["migrate", "backfill", "--stage", "splitter", "--stage", "sink"]
    policies = {d["metadata"]["name"]: d for d in documents if d["kind"] == "NetworkPolicy"}
    for policy in ("migrate-to-kafka", "migrate-to-qdrant", "qdrant-from-migrate", "migrate-https-egress"):
        assert policies[policy]["metadata"]["namespace"] == "colstream"
    assert policies["migrate-to-kafka"]["spec"]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "colstream-migrate"}


def test_the_migrate_kafka_user_covers_the_backfills_topics_and_groups_and_no_serving_one() -> None:
    users = {d["metadata"]["name"]: d for d in yaml.safe_load_all((REPO / "strimzi" / "users.yaml").read_text())
             if d}
    acls = users["colstream-migrate"]["spec"]["authorization"]["acls"]

    def allowed(kind: str, name: str, operation: str) -> bool:
        for acl in acls:
            resource = acl["resource"]
            if resource["type"] != kind or operation not in acl["operations"]:
                continue
            pattern = resource.get("name", "")
            if (resource.get("patternType") == "prefix" and name.startswith(pattern)) or name == pattern:
                return True
        return False

    settings = ColstreamSettings()
    old = IndexModel(family="colqwen2", model_id="a", revision="1", dim=128)
    new = IndexModel(family="colpali", model_id="b", revision="2", dim=128)
    state, _ = plan_start(None, migration_id="3f9c2a1e", source=IndexRef("x--a", "r", old),
                          target=IndexRef("x--b", "r--x--b", new), target_model={"family": "colpali"})
    for topic in backfill_topics(settings, state):
        for operation in ("Create", "Delete", "Read", "Write", "Describe"):
            assert allowed("topic", topic, operation), (topic, operation)
    for group in backfill_groups(settings, state):
        for operation in ("Read", "Delete", "Describe"):
            assert allowed("group", group, operation), (group, operation)
    assert allowed("topic", settings.topics.uploads, "Read") and allowed("topic", settings.topics.dlq, "Write")
    # nothing of the serving pipeline can be written or deleted with it
    for topic in (settings.topics.uploads, settings.topics.pages, settings.topics.vectors, settings.topics.indexed):
        assert not allowed("topic", topic, "Delete") and (topic == settings.topics.dlq or
                                                          not allowed("topic", topic, "Write")), topic
    assert not allowed("group", f"{settings.consumer_group_prefix}sink", "Read")
