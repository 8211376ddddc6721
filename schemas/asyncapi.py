"""The AsyncAPI 3 document of the pipeline's five topics, generated from the pydantic contracts.

``schemas/asyncapi.json`` is what teams that produce to or consume from colstream's
topics read: each topic's address, its key, what its records look like (the same
JSON Schemas as ``schemas/json/``), the tombstone semantics of the compacted topics,
the claim check of page images too large for the pages topic, and one validated
example per message. ``python -m colstream.schemas.asyncapi`` regenerates it and a
unit test fails when it drifts from the models.

Topic names are the defaults of :class:`colstream.infra.settings.TopicSettings`; a
deployment may prefix or rename them (``COLSTREAM_TOPICS__*``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import TypeAdapter

from colstream import __version__
from colstream.schemas.events import (
    PAGE_MESSAGE_SCHEMA,
    VECTORS_MESSAGE_SCHEMA,
    DeadLetter,
    DocumentDeleted,
    DocumentIndexed,
    DocumentRef,
    PageFailed,
    PageTask,
    PageVectors,
    UploadEvent,
)
from colstream.schemas.ids import DOCUMENT_ID_MAX_LENGTH, DOCUMENT_ID_PATTERN, DOCUMENT_ID_RULE

ASYNCAPI_PATH = Path(__file__).resolve().parent / "asyncapi.json"
# AsyncAPI's Kafka bindings.
_BINDING = "0.5.0"
_AT = datetime(2026, 1, 1, 9, 0, tzinfo=UTC)

_KEY = {"type": "string", "minLength": 1, "maxLength": DOCUMENT_ID_MAX_LENGTH, "pattern": DOCUMENT_ID_PATTERN,
        "description": f"The document id. {DOCUMENT_ID_RULE}."}


@dataclass(frozen=True)
class Topics:
    """The topic names and configs the document describes: the defaults of
    ``infra.settings.TopicSettings`` and ``infra.kafka.topic_specs`` (a test keeps them equal;
    ``schemas`` does not import ``infra``)."""

    uploads: str = "documents.uploads"
    pages: str = "documents.pages"
    vectors: str = "documents.vectors"
    indexed: str = "documents.indexed"
    dlq: str = "documents.dlq"
    partitions: int = 6
    replication_factor: int = 1
    uploads_delete_retention_ms: int = 86_400_000
    pages_max_message_bytes: int = 2_097_152
    vectors_max_message_bytes: int = 4_194_304
    dlq_retention_ms: int = 30 * 24 * 3600 * 1000


def _examples() -> dict[str, Any]:
    """One example per message, built through the models so that each one is valid."""
    doc = DocumentRef(document_id="reports/q3-2026", version=42, filename="q3.pdf",
                      blob_uri="https://acct.blob.core.windows.net/documents/reports/q3.pdf",
                      metadata={"tenant": "acme", "year": 2026})
    upload = UploadEvent(document_id="reports/q3-2026", blob_uri=doc.blob_uri or "", filename="q3.pdf",
                         content_type="application/pdf", metadata={"tenant": "acme", "year": 2026})
    page = PageTask(document=doc, page_number=1, total_pages=12, width=1024, height=1325,
                    image_ref="colstream-pages/reports/q3-2026/42/1.jpeg")
    vectors = PageVectors.from_array(document=doc, page_number=1, total_pages=12, model="vidore/colqwen2-v1.0",
                                     array=np.full((2, 4), 0.5, dtype=np.float32))
    failed = PageFailed(document=doc, page_number=7, total_pages=12, stage="splitter", error_type="RenderTimeout",
                        message="page 7 took longer than 20s to render")
    deleted = DocumentDeleted(document=doc.model_copy(update={"version": 43}))
    indexed = DocumentIndexed(document_id="reports/q3-2026", version=42, state="partial", total_pages=12,
                              indexed_pages=11, failed_pages=[7], model="vidore/colqwen2-v1.0",
                              metadata={"tenant": "acme", "year": 2026}, at=_AT)
    letter = DeadLetter(stage="splitter", error_type="EncryptedDocument",
                        message="the PDF needs a password", source_topic="documents.uploads",
                        source_partition=3, source_offset=42, original_key="reports/q3-2026",
                        original_value=upload.model_dump_json(), document_id="reports/q3-2026", version=42,
                        failed_at=_AT)
    return {name: json.loads(model.model_dump_json()) for name, model in {
        "upload": upload, "page": page, "vectors": vectors, "page_failed": failed, "document_deleted": deleted,
        "indexed": indexed, "dead_letter": letter}.items()}


def _schema(contract: Any, schemas: dict[str, Any], name: str) -> dict[str, str]:
    """``contract``'s JSON Schema under components/schemas/``name`` (its definitions beside it)."""
    schema = TypeAdapter(contract).json_schema(ref_template="#/components/schemas/{model}")
    discriminator = schema.get("discriminator")
    if isinstance(discriminator, dict):
        # OpenAPI's {propertyName, mapping}; an AsyncAPI schema names the property alone.
        schema["discriminator"] = discriminator["propertyName"]
    for def_name, definition in schema.pop("$defs", {}).items():
        schemas[def_name] = definition
    schemas[name] = schema
    return {"$ref": f"#/components/schemas/{name}"}


def topic_configs(topics: Topics = Topics()) -> dict[str, dict[str, str]]:
    """Each topic's configuration as the document states it (``topic_specs``'s strings)."""
    return {
        topics.uploads: {"cleanup.policy": "compact", "delete.retention.ms": str(topics.uploads_delete_retention_ms),
                         "min.compaction.lag.ms": "60000"},
        topics.pages: {"max.message.bytes": str(topics.pages_max_message_bytes)},
        topics.vectors: {"max.message.bytes": str(topics.vectors_max_message_bytes)},
        topics.indexed: {"cleanup.policy": "compact"},
        topics.dlq: {"retention.ms": str(topics.dlq_retention_ms)},
    }


# The topic configurations the Kafka binding (0.5.0) has fields for; the rest goes in the description.
_BINDING_CONFIG_KEYS = ("cleanup.policy", "retention.ms", "retention.bytes", "delete.retention.ms",
                        "max.message.bytes")


def _binding_config(config: dict[str, str]) -> dict[str, Any]:
    """A topic config in the Kafka binding's shape (cleanup.policy a list, numbers as numbers)."""
    return {k: (v.split(",") if k == "cleanup.policy" else int(v)) for k, v in config.items()
            if k in _BINDING_CONFIG_KEYS}


def render_asyncapi(topics: Topics = Topics()) -> str:
    configs = topic_configs(topics)
    examples = _examples()
    schemas: dict[str, Any] = {}
    key_binding = {"kafka": {"key": _KEY, "bindingVersion": _BINDING}}

    def message(name: str, title: str, summary: str, payload: dict[str, Any], example: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "title": title, "summary": summary, "contentType": "application/json",
                                "payload": payload, "bindings": key_binding}
        if example is None:
            body["examples"] = [{"name": "tombstone", "summary": "key reports/q3-2026, value null", "payload": None}]
        else:
            body["examples"] = [{"name": example, "summary": "key reports/q3-2026", "payload": examples[example]}]
        return body

    tombstone_payload = {"type": "null", "description": "No value: a tombstone."}
    messages = {
        "UploadEvent": message("UploadEvent", "Upload", "A document to index (again): the latest upload per key "
                               "wins.", _schema(UploadEvent, schemas, "UploadEvent"), "upload"),
        "UploadTombstone": message("UploadTombstone", "Delete (tombstone)", "A record with the document id as key "
                                   "and no value removes the document from the index; compaction later drops "
                                   "both the upload and the tombstone (after delete.retention.ms).",
                                   tombstone_payload, None),
        "PageMessage": message("PageMessage", "Page work", "One rendered page (image inline as image_b64, or a "
                               "claim check in image_ref: a blob name, when the image is too big for the topic), a "
                               "page that failed, or a whole document deleted or failed.",
                               _schema(PAGE_MESSAGE_SCHEMA, schemas, "PageMessage"), "page"),
        "VectorsMessage": message("VectorsMessage", "Page vectors", "One page's multivector (float16, little "
                                  "endian, num_tokens x dim), or the failure/deletion markers passed through.",
                                  _schema(VECTORS_MESSAGE_SCHEMA, schemas, "VectorsMessage"), "vectors"),
        "DocumentIndexed": message("DocumentIndexed", "Document settled", "Every page of a version is settled: "
                                   "complete, partial (failed_pages), failed or deleted. Compacted: the latest per "
                                   "document stays.", _schema(DocumentIndexed, schemas, "DocumentIndexed"),
                                   "indexed"),
        "DeadLetter": message("DeadLetter", "Dead letter", "A record a stage could not process, with the reason and "
                              "the original record (redrive sends it back to source_topic).",
                              _schema(DeadLetter, schemas, "DeadLetter"), "dead_letter"),
    }
    messages["PageMessage"]["examples"].append({"name": "page_failed", "payload": examples["page_failed"]})
    messages["VectorsMessage"]["examples"].append({"name": "document_deleted",
                                                   "payload": examples["document_deleted"]})

    def channel(topic: str, description: str, names: list[str]) -> dict[str, Any]:
        config = _binding_config(configs[topic])
        others = ", ".join(f"{k}={v}" for k, v in configs[topic].items() if k not in _BINDING_CONFIG_KEYS)
        return {
            "address": topic,
            "description": description + (f" Also configured: {others}." if others else ""),
            "messages": {n: {"$ref": f"#/components/messages/{n}"} for n in names},
            "bindings": {"kafka": {"topic": topic, "partitions": topics.partitions,
                                   "replicas": topics.replication_factor, "topicConfiguration": config,
                                   "bindingVersion": _BINDING}},
        }

    channels = {
        "uploads": channel(topics.uploads, "Documents to index, keyed by document id. Compacted: the latest record "
                           "per document is the source of truth and the whole index can be rebuilt from it. "
                           "A record's offset is the document's version downstream.",
                           ["UploadEvent", "UploadTombstone"]),
        "pages": channel(topics.pages, "Rendered pages, keyed by document id (so one document's pages stay in "
                         "order on one partition).", ["PageMessage"]),
        "vectors": channel(topics.vectors, "Page multivectors, keyed by document id.", ["VectorsMessage"]),
        "indexed": channel(topics.indexed, "Completion events, keyed by document id; compacted.",
                           ["DocumentIndexed"]),
        "dlq": channel(topics.dlq, "Dead letters of every stage, kept 30 days, keyed by the original key.",
                       ["DeadLetter"]),
    }

    def op(action: str, chan: str, names: list[str], summary: str) -> dict[str, Any]:
        return {"action": action, "channel": {"$ref": f"#/channels/{chan}"}, "summary": summary,
                "messages": [{"$ref": f"#/channels/{chan}/messages/{n}"} for n in names]}

    operations = {
        "publishUpload": op("send", "uploads", ["UploadEvent", "UploadTombstone"],
                            "Producers (the API, `colstream publish`, Event Grid) announce uploads and deletes."),
        "splitUploads": op("receive", "uploads", ["UploadEvent", "UploadTombstone"],
                           "The splitter (group <prefix>splitter) renders each upload into pages."),
        "producePages": op("send", "pages", ["PageMessage"], "The splitter produces one record per page."),
        "embedPages": op("receive", "pages", ["PageMessage"], "The embedder (group <prefix>embedder)."),
        "produceVectors": op("send", "vectors", ["VectorsMessage"], "The embedder produces one record per page."),
        "sinkVectors": op("receive", "vectors", ["VectorsMessage"], "The sink (group <prefix>sink) writes Qdrant."),
        "announceIndexed": op("send", "indexed", ["DocumentIndexed"], "The sink announces settled versions."),
        "awaitIndexed": op("receive", "indexed", ["DocumentIndexed"],
                           "Upstream services and the webhooks stage wait for their documents."),
        "deadLetter": op("send", "dlq", ["DeadLetter"], "Every stage dead-letters what it cannot process."),
        "readDeadLetters": op("receive", "dlq", ["DeadLetter"], "`colstream dlq` and the console read and redrive."),
    }

    document = {
        "asyncapi": "3.0.0",
        "info": {
            "title": "colstream",
            "version": __version__,
            "description": "Kafka topics of the colstream pipeline: uploads -> splitter -> pages -> embedder -> "
                           "vectors -> sink -> indexed, with a dead-letter topic. Every record is keyed by its "
                           "document id and is JSON (UTF-8). Delivery is at least once and every consumer is "
                           "idempotent: a version (the upload's offset) is written once, latest wins.",
        },
        "defaultContentType": "application/json",
        "servers": {"kafka": {"host": "localhost:9092", "protocol": "kafka",
                              "description": "KAFKA_BOOTSTRAP_SERVERS; SASL/TLS through COLSTREAM_KAFKA__*."}},
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": dict(sorted(schemas.items()))},
    }
    return json.dumps(document, indent=2, sort_keys=False) + "\n"


def write_asyncapi(path: Path = ASYNCAPI_PATH) -> Path:
    path.write_text(render_asyncapi())
    return path


if __name__ == "__main__":
    print(write_asyncapi(Path(sys.argv[1]) if len(sys.argv) > 1 else ASYNCAPI_PATH))
