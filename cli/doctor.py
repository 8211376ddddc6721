"""``colstream doctor``: what is wrong with this installation, and how to fix it.

Checks, each with a one-line verdict and a fix: the broker (reachable, credentials,
protocol), the pipeline's topics and the configs the pipeline relies on, the ACLs
the stages need, the vector store, the model and the GPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

import typer

from colstream.app import load_settings, local_kafka
from colstream.cli.common import console
from colstream.infra.settings import ColstreamSettings

Verdict = Literal["ok", "warn", "fail"]


@dataclass
class Check:
    name: str
    verdict: Verdict
    detail: str
    fix: str | None = None


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)


def doctor(as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False) -> None:
    """Check the broker, the topics and their configs, the ACLs, the store, the model and the GPU."""
    settings = load_settings()
    if not settings.kafka.bootstrap_servers and local_kafka(settings).is_running():
        settings = settings.updated(kafka={"bootstrap_servers": local_kafka(settings).bootstrap_servers})
    checks = run_checks(settings)
    if as_json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        from rich.table import Table

        table = Table("check", "", "detail", "how to fix", show_lines=False)
        style = {"ok": "[green]ok[/green]", "warn": "[yellow]warn[/yellow]", "fail": "[red]FAIL[/red]"}
        for c in checks:
            table.add_row(c.name, style[c.verdict], c.detail, c.fix or "")
        console.print(table)
    raise typer.Exit(1 if any(c.verdict == "fail" for c in checks) else 0)


def run_checks(settings: ColstreamSettings) -> list[Check]:
    checks: list[Check] = []
    broker = _guard("broker", lambda: check_kafka(settings))
    checks.append(broker)
    if broker.verdict != "fail":
        checks.extend(_guard_many("topics", lambda: check_topics(settings)))
    for name, fn in (("store", check_store), ("model", check_model), ("gpu", check_gpu)):
        checks.append(_guard(name, lambda fn=fn: fn(settings)))  # type: ignore[misc]
    return checks


def _guard(name: str, fn: Callable[[], Check]) -> Check:
    try:
        return fn()
    except Exception as exc:
        return Check(name, "fail", f"{type(exc).__name__}: {str(exc)[:300]}")


def _guard_many(name: str, fn: Callable[[], list[Check]]) -> list[Check]:
    try:
        return fn()
    except Exception as exc:
        return [Check(name, "fail", f"{type(exc).__name__}: {str(exc)[:300]}")]


def check_kafka(settings: ColstreamSettings) -> Check:
    from colstream.infra.kafka_check import BrokerProblem, check_broker

    if not settings.kafka.bootstrap_servers:
        return Check("broker", "fail", "no broker configured and no local broker running",
                     "set KAFKA_BOOTSTRAP_SERVERS, or run `colstream kafka start`")
    try:
        metadata = check_broker(settings, timeout_s=10.0)
    except BrokerProblem as exc:
        return Check("broker", "fail", str(exc), "see the message")
    return Check("broker", "ok", f"{settings.kafka.bootstrap_servers}: {len(metadata.brokers)} broker(s), "
                 f"{settings.kafka.security_protocol}")


def check_topics(settings: ColstreamSettings) -> list[Check]:
    from confluent_kafka.admin import AdminClient

    from colstream.infra.kafka import describe_topic_configs, topic_specs
    from colstream.infra.kafka_check import explain

    admin = AdminClient(settings.kafka.common_config())
    checks: list[Check] = []
    for spec in topic_specs(settings.topics):
        name = spec.topic
        meta = admin.list_topics(name, timeout=10).topics.get(name)
        if meta is None or (meta.error is not None and meta.error.code() == 3):  # UNKNOWN_TOPIC_OR_PART
            checks.append(Check(f"topic {name}", "fail", "missing", "colstream topics create"))
            continue
        if meta.error is not None:
            checks.append(Check(f"topic {name}", "fail", explain(settings, meta.error, resource="topic", name=name,
                                                                   operation="Describe"), "grant the ACL shown"))
            continue
        try:
            actual = describe_topic_configs(settings, [name])[name]
        except Exception as exc:
            checks.append(Check(f"topic {name}", "warn", f"configs not readable: {exc}",
                                f"grant DescribeConfigs on topic {name}"))
            continue
        wrong = {k: (v, actual.get(k)) for k, v in (spec.config or {}).items() if actual.get(k) != v}
        partitions = len(meta.partitions)
        if wrong:
            detail = ", ".join(f"{k}={got} (want {want})" for k, (want, got) in wrong.items())
            fix = f"kafka-configs --alter --entity-type topics --entity-name {name} --add-config " + ",".join(
                f"{k}={want}" for k, (want, _) in wrong.items())
            checks.append(Check(f"topic {name}", "warn", f"{partitions} partitions; {detail}", fix))
        else:
            checks.append(Check(f"topic {name}", "ok", f"{partitions} partitions, configs as expected"))
    return checks


def check_store(settings: ColstreamSettings) -> Check:
    from colstream.infra.vectorstore import open_vector_store

    where = settings.qdrant.url or str(settings.qdrant.path)
    try:
        store = open_vector_store(settings.qdrant)
    except Exception as exc:
        return Check("store", "fail", f"{where}: {type(exc).__name__}: {str(exc)[:200]}",
                     "check QDRANT_URL / QDRANT_API_KEY, or that no other process holds the embedded store")
    try:
        stats = store.stats()
    finally:
        store.close()
    return Check("store", "ok", f"{where}: {stats.get('total_vectors', 0)} vectors")


def check_model(settings: ColstreamSettings) -> Check:
    name = settings.model.name_or_path
    if not name:
        return Check("model", "warn", f"no model configured (family {settings.model.family})",
                     "set COLSTREAM_MODEL__NAME_OR_PATH to a checkpoint, or use `--tiny-model` for offline runs")
    path = Path(name)
    if path.exists():
        if not any(path.glob("*.safetensors")) and not any(path.glob("**/*.safetensors")):
            return Check("model", "fail", f"{name}: no *.safetensors weights", "point COLSTREAM_MODEL__NAME_OR_PATH "
                         "at a downloaded checkpoint")
        return Check("model", "ok", f"{name} (local checkpoint)")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:
        cached = None
    if isinstance(cached, str):
        return Check("model", "ok", f"{name} (in the Hugging Face cache)")
    return Check("model", "warn", f"{name} is not a local path and not in the Hugging Face cache",
                 "download it once (huggingface-cli download), or use `--tiny-model` for offline runs")


def check_gpu(settings: ColstreamSettings) -> Check:
    try:
        import torch
    except ImportError:
        return Check("gpu", "warn", "torch is not installed", "install colstream with its dependencies")
    device = getattr(settings.model, "device", "auto")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return Check("gpu", "ok", f"CUDA {torch.version.cuda}: {names}")
    verdict: Verdict = "fail" if str(device).startswith("cuda") else "warn"
    return Check("gpu", verdict, "no CUDA device: the embedder runs on the CPU (slow for real models)",
                 "run the embedder on a GPU node" + (f" or unset COLSTREAM_MODEL__DEVICE={device}"
                                                      if verdict == "fail" else ""))
