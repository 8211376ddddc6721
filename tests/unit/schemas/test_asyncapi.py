"""The AsyncAPI document: committed as generated, in step with the topics and their configs,
examples that the codec decodes, and (where Node.js is here) accepted by the AsyncAPI parser."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest

from colstream.infra.kafka import topic_specs
from colstream.infra.settings import TopicSettings
from colstream.schemas import UploadEvent, decode_page_message, decode_vectors
from colstream.schemas.asyncapi import ASYNCAPI_PATH, Topics, render_asyncapi, topic_configs
from colstream.schemas.events import DeadLetter, DocumentIndexed

REPO = Path(__file__).resolve().parents[3]
PARSER_DIR = REPO / ".colstream" / "tools" / "asyncapi-parser"


def test_the_committed_document_is_current() -> None:
    assert ASYNCAPI_PATH.read_text() == render_asyncapi(), "stale: run python -m colstream.schemas.asyncapi"


def test_topics_and_configs_match_what_the_pipeline_creates() -> None:
    defaults = TopicSettings()
    described = asdict(Topics())
    for name in ("uploads", "pages", "vectors", "indexed", "dlq", "partitions", "replication_factor",
                 "uploads_delete_retention_ms", "pages_max_message_bytes", "vectors_max_message_bytes"):
        assert described[name] == getattr(defaults, name), name
    assert topic_configs() == {spec.topic: dict(spec.config or {}) for spec in topic_specs(defaults)}


def test_the_five_topics_their_keys_tombstones_and_examples() -> None:
    doc = json.loads(ASYNCAPI_PATH.read_text())
    assert doc["asyncapi"].startswith("3.")
    assert {c["address"] for c in doc["channels"].values()} == {
        "documents.uploads", "documents.pages", "documents.vectors", "documents.indexed", "documents.dlq"}
    messages = doc["components"]["messages"]
    for message in messages.values():
        assert message["bindings"]["kafka"]["key"]["pattern"].startswith("^")
    assert messages["UploadTombstone"]["payload"]["type"] == "null"
    assert set(doc["channels"]["uploads"]["messages"]) == {"UploadEvent", "UploadTombstone"}
    assert doc["channels"]["uploads"]["bindings"]["kafka"]["topicConfiguration"]["cleanup.policy"] == ["compact"]
    decoders: dict[str, Callable[[bytes], object]] = {
                "UploadEvent": UploadEvent.model_validate_json, "PageMessage": decode_page_message,
                "VectorsMessage": decode_vectors, "DocumentIndexed": DocumentIndexed.model_validate_json,
                "DeadLetter": DeadLetter.model_validate_json}
    for name, decode in decoders.items():
        examples = messages[name]["examples"]
        assert examples
        for example in examples:
            decode(json.dumps(example["payload"]).encode())
    assert "image_ref" in json.dumps(messages["PageMessage"]["examples"])  # the claim check is shown


@pytest.mark.slow  # installs the parser from npm once, then parses the document in Node.js
def test_the_asyncapi_parser_accepts_it() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("no Node.js")
    if not (PARSER_DIR / "node_modules" / "@asyncapi" / "parser").exists():
        npm = shutil.which("npm")
        PARSER_DIR.mkdir(parents=True, exist_ok=True)
        installed = npm is not None and subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--prefix", str(PARSER_DIR), "@asyncapi/parser@3"],
            capture_output=True, timeout=300, check=False).returncode == 0
        if not installed:
            pytest.skip("the AsyncAPI parser did not install (no registry here)")
    script = PARSER_DIR / "validate.mjs"
    shutil.copyfile(REPO / "tests" / "fixtures" / "asyncapi_validate.mjs", script)
    proc = subprocess.run([node, str(script), str(ASYNCAPI_PATH)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "parsed: 5 channels" in proc.stdout
