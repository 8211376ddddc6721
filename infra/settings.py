"""One settings root for every stage, producer and tool.

Everything reads ``COLSTREAM_*`` environment variables (nested with ``__``, e.g.
``COLSTREAM_KAFKA__LINGER_MS=50``). Two well-known variables win over the
prefixed ones because platform teams already export them:
``KAFKA_BOOTSTRAP_SERVERS`` and ``QDRANT_URL``.

Settings are resolved once and frozen: nothing changes them at run time. A caller
that needs a variation (a test's topics, the broker the CLI just started, a tiny
model) derives a new object with :meth:`ColstreamSettings.updated`.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from colstream.schemas.events import METADATA_KEY_PATTERN

# A shared secret shorter than this is guessable; `openssl rand -hex 24` gives 48.
EVENTGRID_MIN_SECRET_CHARS = 16


def default_state_dir() -> Path:
    return Path(os.environ.get("COLSTREAM_STATE_DIR", Path.cwd() / ".colstream")).resolve()


class Section(BaseModel):
    """A frozen group of settings."""

    model_config = ConfigDict(frozen=True)


class KafkaSettings(Section):
    # None means "nobody configured a broker": the CLI may then start or reuse the
    # local development broker. An explicit value always wins.
    bootstrap_servers: str | None = None
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: str | None = None
    client_id: str = "colstream"
    # Throughput knobs; bench/kafka_tuning.py measures them against librdkafka's defaults.
    linger_ms: int = 20
    batch_size: int = 1_000_000
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    fetch_max_bytes: int = 52_428_800
    max_partition_fetch_bytes: int = 4_194_304
    # A GPU batch or a 1,000-page render must finish well inside this; stages pause
    # partitions and keep polling, so it bounds one batch, not one document.
    max_poll_interval_ms: int = 300_000
    session_timeout_ms: int = 45_000
    # Static membership (KIP-345): a restarted replica with the same id (e.g. a
    # StatefulSet pod name) takes its partitions back without a group rebalance.
    group_instance_id: str | None = None
    # How long a publisher (API, CLI) waits for the broker's acknowledgement before it
    # answers that the outcome is unknown (the record stays queued and may still land).
    publish_timeout_s: float = Field(default=60.0, gt=0)
    # The producer's own view of the biggest record it may send; topics are created
    # with a matching max.message.bytes.
    message_max_bytes: int = 4_194_304

    def common_config(self) -> dict[str, Any]:
        if not self.bootstrap_servers:
            raise RuntimeError(
                "no Kafka broker configured: set KAFKA_BOOTSTRAP_SERVERS or run `colstream kafka start`"
            )
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            "client.id": self.client_id,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username:
            conf["sasl.username"] = self.sasl_username
        if self.sasl_password is not None:
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        if self.ssl_ca_location:
            conf["ssl.ca.location"] = self.ssl_ca_location
        # librdkafka's errors and log lines, one line per kind per interval with a count.
        from colstream.infra.kafka_logs import kafka_log_config

        return kafka_log_config(conf)

    def producer_config(self) -> dict[str, Any]:
        return {
            **self.common_config(),
            "linger.ms": self.linger_ms,
            "batch.size": self.batch_size,
            "compression.type": self.compression_type,
            "message.max.bytes": self.message_max_bytes,
            # Idempotence keeps per-partition order and removes broker-side duplicates
            # on retry, which the sink's latest-wins rule relies on.
            "enable.idempotence": True,
            "acks": "all",
        }

    def consumer_config(self, group_id: str) -> dict[str, Any]:
        static = {"group.instance.id": self.group_instance_id} if self.group_instance_id else {}
        return {
            **static,
            **self.common_config(),
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "max.poll.interval.ms": self.max_poll_interval_ms,
            "session.timeout.ms": self.session_timeout_ms,
            "fetch.max.bytes": self.fetch_max_bytes,
            "max.partition.fetch.bytes": self.max_partition_fetch_bytes,
            "isolation.level": "read_committed",
        }


class TopicSettings(Section):
    uploads: str = "documents.uploads"
    pages: str = "documents.pages"
    vectors: str = "documents.vectors"
    indexed: str = "documents.indexed"
    dlq: str = "documents.dlq"
    partitions: int = 6
    replication_factor: int = 1
    # Biggest record a pages/vectors topic accepts. Page images bigger than what
    # fits travel through blob storage (claim check).
    pages_max_message_bytes: int = 2_097_152
    vectors_max_message_bytes: int = 4_194_304
    # Tombstones stay readable this long on the compacted uploads topic, so a
    # replay from the beginning still sees recent deletes.
    uploads_delete_retention_ms: int = 86_400_000

    def all_names(self) -> list[str]:
        return [self.uploads, self.pages, self.vectors, self.indexed, self.dlq]


class BlobSettings(Section):
    # Local paths published with `colstream publish upload` are copied here when no
    # Azure container is configured; `file://` URIs are only honoured under it.
    local_root: Path = Field(default_factory=lambda: default_state_dir() / "blobs")
    # Allowlist for https:// blob URIs: storage account names and containers.
    azure_accounts: list[str] = Field(default_factory=list)
    azure_containers: list[str] = Field(default_factory=list)
    # Upload target for `publish upload` of a local file, e.g. "documents".
    azure_upload_container: str | None = None
    azure_auth: Literal["connection_string", "sas", "default_credential"] = "connection_string"
    azure_connection_string: SecretStr | None = None
    azure_sas_token: SecretStr | None = None
    # Accounts served by an emulator (Azurite) at a custom endpoint, e.g.
    # {"devstoreaccount1": "http://127.0.0.1:10000/devstoreaccount1"}.
    azure_endpoints: dict[str, str] = Field(default_factory=dict)
    claim_check_container: str = "colstream-claims"
    # Account that put_bytes/put_file write to when azure_upload_container is set;
    # defaults to the connection string's account, else the only allowlisted one.
    azure_upload_account: str | None = None
    # Where downloads are spooled (bounded temp files); None = the system temp dir.
    download_dir: Path | None = None
    # Largest piece of a blob held in memory at once while streaming it.
    chunk_bytes: int = 4 * 1024 * 1024
    azure_timeout_s: float = 60.0


class LimitSettings(Section):
    max_blob_bytes: int = 256 * 1024 * 1024
    max_pages: int = 2_000
    # Decompression bombs: refuse before decoding anything this large.
    max_pixels_per_page: int = 50_000_000
    max_image_pixels: int = 100_000_000
    # /embed and /embed_batch (api/images.py): the JSON body, checked before it is parsed;
    # one image's pixels read from its header (after a JPEG's DCT downscale); all images
    # of one request together; decodes running at once; the size images are reduced to
    # as they are decoded (the model's processor resizes to far less).
    max_embed_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    max_embed_image_pixels: int = Field(default=25_000_000, ge=1)
    max_embed_request_pixels: int = Field(default=50_000_000, ge=1)
    max_concurrent_decodes: int = Field(default=2, ge=1)
    embed_decode_max_pixels: int = Field(default=2048 * 2048, ge=1)
    render_timeout_s: float = 30.0


class ConverterSettings(Section):
    """Office/HTML/text documents are converted to PDF by LibreOffice headless first."""

    # Converter processes, each with its own LibreOffice user profile; one conversion at a time each.
    processes: int = Field(default=1, ge=1)
    timeout_s: float = Field(default=60.0, gt=0)
    # Address-space limit (RLIMIT_AS) of each LibreOffice process.
    memory_bytes: int = Field(default=2 * 1024**3, ge=256 * 1024**2)
    # A converter process (and its profile) is replaced after this many conversions, or any failure.
    recycle_after: int = Field(default=50, ge=1)
    # Zip-bomb guards, checked on the ZIP central directory before LibreOffice sees the file.
    max_archive_entries: int = Field(default=10_000, ge=1)
    max_archive_uncompressed_bytes: int = Field(default=512 * 1024**2, ge=1)
    max_archive_ratio: float = Field(default=200.0, gt=1)
    soffice: str = "soffice"


class ModelSettings(Section):
    # A family of embedding/families.py; the id/path is passed to from_pretrained as-is.
    family: Literal[
        "colqwen2", "colqwen2_5", "colqwen3", "colqwen3_5", "colpali", "colidefics3", "colmodernvbert", "colgemma3"
    ] = "colqwen2"
    name_or_path: str | None = None
    # Hub revision (branch, tag or commit) of name_or_path; recorded with the index.
    revision: str | None = None
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["none", "int8"] = "none"
    max_visual_tokens: int = 768
    batch_size: int = 8
    batch_timeout_ms: int = 50
    preprocess_workers: int = 2
    attn_implementation: str | None = None


class QdrantSettings(Section):
    url: str | None = None
    api_key: SecretStr | None = None
    path: Path = Field(default_factory=lambda: default_state_dir() / "qdrant")
    collection: str = "colpali_embeddings"
    records_collection: str = "colstream_documents"
    on_disk_float16: bool = True
    # Storage options (see infra/vectorstore.py; measured by bench/storage_options.py); off by default.
    token_pooling_factor: int = 0
    mean_pooled_prefetch: bool = False
    # Qdrant's write limits (consumers/sink/limits.py): a page whose multivector would reach
    # 1,048,576 numbers, or whose request would pass the server's body limit, is pooled
    # down to fit with this pooler; "off" dead-letters it as VectorsTooLarge instead.
    oversize_pooler: Literal["hierarchical", "off"] = "hierarchical"
    # The server's service.max_request_size_mb (REST); upserts are split to stay under it.
    max_request_mb: int = Field(default=32, ge=1)
    # Upload metadata keys that get a payload index on the pages and may be used in a
    # search filter. ``tenant`` is indexed as the tenant key (``is_tenant`` on a server).
    indexed_metadata: list[str] = Field(default_factory=lambda: ["tenant"])
    # Qdrant cluster layout, applied when colstream creates a collection on a server (the
    # embedded Edge store is one local shard and ignores them). None keeps the server's
    # default. docs/capacity.md sizes them.
    shard_number: int | None = Field(default=None, ge=1, le=1024)
    replication_factor: int | None = Field(default=None, ge=1, le=16)
    write_consistency_factor: int | None = Field(default=None, ge=1, le=16)
    # A quantized first stage on a server: the scan scores compact copies of the vectors
    # kept in RAM, then rescores the best ``oversampling`` x limit candidates on the stored
    # vectors. int8 keeps 1 byte per number, binary 1 bit (docs/performance.md measures
    # both against exact MaxSim). The embedded store always scans exact vectors.
    quantization: Literal["none", "int8", "binary"] = "none"
    quantization_oversampling: float = Field(default=3.0, ge=1.0, le=32.0)
    # On a server, a migration run as Kubernetes Jobs keeps its state in this collection
    # (one point per alias), where every pod can read it (colstream.migration.cluster).
    migrations_collection: str = Field(default="colstream_migrations", min_length=1, max_length=255)
    # How often an API on a server looks where the alias points: a cutover run by a Job
    # moves it, and each API replica follows within this many seconds.
    alias_follow_s: float = Field(default=5.0, ge=0.1, le=3600.0)

    @model_validator(mode="after")
    def _consistency_within_replicas(self) -> QdrantSettings:
        replicas = self.replication_factor or 1
        if self.write_consistency_factor is not None and self.write_consistency_factor > replicas:
            raise ValueError(
                f"write_consistency_factor {self.write_consistency_factor} exceeds replication_factor "
                f"{replicas}: a write would wait for replicas that do not exist"
            )
        return self

    def cluster_layout(self, sharded: bool = True) -> dict[str, int]:
        """The create_collection arguments that place a collection in the cluster (the small
        records collection is replicated but never sharded)."""
        layout = {
            "shard_number": self.shard_number if sharded else None,
            "replication_factor": self.replication_factor,
            "write_consistency_factor": self.write_consistency_factor,
        }
        return {name: value for name, value in layout.items() if value is not None}

    @field_validator("indexed_metadata")
    @classmethod
    def _metadata_keys(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if not METADATA_KEY_RE.fullmatch(key):
                raise ValueError(f"indexed metadata key {key!r} must match {METADATA_KEY_RE.pattern}")
        return list(dict.fromkeys(keys))


# Metadata keys end up in payload paths (``metadata.<key>``): no dots, no spaces.
METADATA_KEY_RE = re.compile(METADATA_KEY_PATTERN)

ApiScope = Literal["read", "write", "delete", "admin"]
_SHA256_HEX_RE = re.compile(r"[0-9a-fA-F]{64}")


class ApiKeySpec(Section):
    """One API key: the key itself (or its SHA-256), what it may do, and whose data it sees."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    key: SecretStr | None = None
    key_sha256: SecretStr | None = Field(default=None, description="Hex SHA-256 of the key, instead of the key.")
    scopes: list[ApiScope] = Field(min_length=1)
    tenant: str | None = Field(default=None, min_length=1, max_length=256)
    # A label for operators (never the key); shows up nowhere but in errors about the spec.
    name: str | None = Field(default=None, max_length=128)

    @model_validator(mode="after")
    def _one_key_and_admin_spans_tenants(self) -> ApiKeySpec:
        label = f"API key {self.name!r}" if self.name else "an API key"
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError(f"{label} needs exactly one of 'key' and 'key_sha256'")
        if self.key is not None and len(self.key.get_secret_value()) < 16:
            raise ValueError(f"{label} is shorter than 16 characters; generate one with `openssl rand -hex 32`")
        if self.key_sha256 is not None and not _SHA256_HEX_RE.fullmatch(self.key_sha256.get_secret_value()):
            raise ValueError(f"{label}: key_sha256 must be 64 hex characters")
        if "admin" in self.scopes and self.tenant is not None:
            raise ValueError(
                f"{label} holds 'admin' and tenant {self.tenant!r}: admin spans every tenant; "
                "drop the tenant or the admin scope"
            )
        return self


class ApiSettings(Section):
    # None: 0.0.0.0 when API keys are configured, else loopback only (see api.auth).
    host: str | None = None
    port: int = 8000
    public_url: str = "http://127.0.0.1:8000"
    # JSON list of ApiKeySpec, e.g. COLSTREAM_API__KEYS='[{"key": "...", "scopes": ["read"]}]'.
    keys: list[ApiKeySpec] = Field(default_factory=list)
    # The same list read from a file (a mounted Kubernetes Secret); adds to ``keys``.
    keys_file: Path | None = None
    # Serve a non-loopback address without any key. Only for networks that are private by other means.
    allow_unauthenticated: bool = False
    # Request bodies above this are refused with 413 while they stream in.
    max_upload_bytes: int = Field(default=256 * 1024 * 1024 + 1024 * 1024, ge=1024)


WebhookEvent = Literal["complete", "partial", "failed", "deleted"]
ALL_WEBHOOK_EVENTS: list[WebhookEvent] = ["complete", "partial", "failed", "deleted"]


class WebhookEndpoint(Section):
    """A receiver of signed ``DocumentIndexed`` events (Standard Webhooks)."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    url: str = Field(min_length=8, max_length=2048)
    secret: SecretStr = Field(description="whsec_<base64>, as the Standard Webhooks specification writes it.")
    tenant: str | None = Field(default=None, min_length=1, max_length=256)
    events: list[WebhookEvent] = Field(default_factory=lambda: list(ALL_WEBHOOK_EVENTS), min_length=1)

    @field_validator("secret")
    @classmethod
    def _whsec(cls, secret: SecretStr) -> SecretStr:
        value = secret.get_secret_value()
        if not value.startswith("whsec_"):
            raise ValueError("webhook secret must start with 'whsec_' followed by base64")
        try:
            raw = base64.b64decode(value[len("whsec_") :], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("webhook secret after 'whsec_' is not valid base64") from exc
        if len(raw) < 24:
            raise ValueError("webhook secret must hold at least 24 random bytes (32 recommended)")
        return secret


# An allowlist entry: a DNS name, an IPv4 literal or a bracketed IPv6 literal, with an optional port.
_ALLOWED_HOST_RE = re.compile(r"(?:[a-z0-9_](?:[a-z0-9_.-]{0,251}[a-z0-9_])?|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?")


class WebhookSettings(Section):
    # JSON list of WebhookEndpoint.
    endpoints: list[WebhookEndpoint] = Field(default_factory=list)
    # Hosts webhooks may be sent to, "host" (the scheme's default port) or "host:port"
    # ("[::1]:8080" for IPv6). Loopback only when listed; link-local and cloud metadata
    # addresses never, listed or not.
    allowed_hosts: list[str] = Field(default_factory=list)
    # Plain http:// targets; off: only https, except to an explicitly listed loopback host.
    allow_http: bool = False
    # One delivery is retried with exponential backoff and jitter for at most this long,
    # then dead-lettered with the last status. With timeout_s it stays inside the consumer's
    # max.poll.interval.ms (300 s), which a rebalance waiting on a retry must not reach.
    retry_for_s: float = Field(default=240.0, gt=0)
    backoff_initial_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    timeout_s: float = Field(default=10.0, gt=0)
    # Batches of indexed events delivered concurrently: a slow endpoint holds back
    # commits, not other endpoints, until this many batches wait on it.
    max_in_flight: int = Field(default=64, ge=1)
    batch_size: int = Field(default=16, ge=1)
    batch_timeout_ms: int = Field(default=100, ge=1)
    # Requests open at once to one endpoint; others are never held back by it.
    concurrency_per_endpoint: int = Field(default=4, ge=1)

    @field_validator("allowed_hosts")
    @classmethod
    def _host_entries(cls, entries: list[str]) -> list[str]:
        cleaned = []
        for entry in entries:
            value = entry.strip().lower()
            if not _ALLOWED_HOST_RE.fullmatch(value):
                raise ValueError(f"webhook allowed host {entry!r} must be 'host' or 'host:port'")
            port = value.rsplit(":", 1)[1] if value.rfind(":") > value.rfind("]") else None
            if port is not None and not 0 < int(port) < 65536:
                raise ValueError(f"webhook allowed host {entry!r}: port out of range")
            cleaned.append(value)
        return list(dict.fromkeys(cleaned))

    @model_validator(mode="after")
    def _backoff_bounds(self) -> WebhookSettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("webhooks.backoff_max_s must not be below webhooks.backoff_initial_s")
        return self


class EventGridSettings(Section):
    # Rule for document_id from a blob URL: "{container}/{blob}" by default.
    document_id_template: str = "{container}/{blob}"
    dedupe_capacity: int = 100_000
    # CloudEvents abuse protection: origins allowed to deliver (WebHook-Request-Origin).
    allowed_origins: list[str] = Field(default_factory=lambda: ["eventgrid.azure.net"])
    # validationUrl / WebHook-Request-Callback hosts we are willing to GET (SSRF guard).
    validation_host_suffixes: list[str] = Field(
        default_factory=lambda: [".eventgrid.azure.net", ".eventgrid.azure.us", ".eventgrid.azure.cn"]
    )
    # Secret the subscription appends as ?key=... to the webhook URL (or sends in the
    # X-Colstream-Eventgrid-Key delivery header). Without one the route is not mounted,
    # unless allow_unauthenticated says, explicitly, that anyone may post deliveries.
    shared_secret: SecretStr | None = None
    allow_unauthenticated: bool = False
    # Event Grid batches are at most 1 MB; anything much bigger is not Event Grid.
    max_body_bytes: int = 2 * 1024 * 1024
    # BlobCreated with these APIs carry no content yet (ADLS Gen2 creates the empty
    # file first, then fires again on FlushWithClose).
    ignored_created_apis: list[str] = Field(default_factory=lambda: ["CreateFile"])

    @field_validator("shared_secret")
    @classmethod
    def _strong_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < EVENTGRID_MIN_SECRET_CHARS:
            raise ValueError(
                f"the Event Grid shared secret must be at least {EVENTGRID_MIN_SECRET_CHARS} characters "
                "(e.g. `openssl rand -hex 24`)"
            )
        return value


class SplitterSettings(Section):
    # Render worker processes (PDFium is not thread-safe): about one per core.
    render_processes: int = Field(default=2, ge=1)
    # One upload per batch bounds what a rebalance waits for.
    batch_size: int = Field(default=1, ge=1)
    batch_timeout_ms: int = Field(default=50, ge=1)
    max_in_flight: int = Field(default=1, ge=1)


class EmbedderSettings(Section):
    # The micro-batch size and its timeout are the model's (``model.batch_size``);
    # this many batches may be in flight, so preprocessing overlaps the forward pass.
    max_in_flight: int = Field(default=4, ge=1)


class SinkSettings(Section):
    batch_size: int = Field(default=64, ge=1)
    batch_timeout_ms: int = Field(default=100, ge=1)
    max_in_flight: int = Field(default=1, ge=1)


class PageImageSettings(Section):
    """``GET /documents/{id}/pages/{n}/image``: pages rendered on demand from the stored blob."""

    # Widths above this are refused: a page image is for looking at, not for re-indexing.
    max_width: int = Field(default=1600, ge=64, le=4096)
    default_width: int = Field(default=800, ge=16, le=4096)
    image_format: Literal["webp", "jpeg"] = "webp"
    # None: <state_dir>/page-images. Least recently used images are removed past max_bytes.
    cache_dir: Path | None = None
    cache_max_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    # Each render runs in its own process, killed when it takes longer than this.
    render_timeout_s: float = Field(default=20.0, gt=0)
    max_concurrent_renders: int = Field(default=2, ge=1)


class GcSettings(Section):
    """Blobs colstream stored itself (uploads/, claims/) and expired records (``colstream gc``)."""

    # A blob no record points at is removed once it is this old: long enough for any
    # upload still on its way through the pipeline (or an unknown-outcome publish) to land.
    orphan_min_age_s: float = Field(default=86_400.0, ge=0)
    # A failed version's upload stays this long after the failure, for a redrive.
    failed_retention_s: float = Field(default=7 * 86_400.0, ge=0)
    # Superseded blobs the sink waits to release until the newer version settles (per process).
    max_pending_releases: int = Field(default=100_000, ge=1)


class ShutdownSettings(Section):
    # On SIGTERM a stage stops polling and gives in-flight work this long before it
    # leaves uncommitted work to be replayed. Pod grace periods must exceed it.
    grace_s: float = Field(default=20.0, gt=0)


class MetricsSettings(Section):
    # A stage run alone serves /metrics, /livez and /readyz here; `run all` serves
    # them on the API port instead (and here when it runs without the API).
    host: str = "0.0.0.0"
    port: int = Field(default=9400, ge=0, le=65535)
    # How often the pages-pending gauge is recomputed from the consumer groups' offsets.
    pending_interval_s: float = Field(default=15.0, gt=0)
    # librdkafka statistics (consumer lag per partition) every this many ms; 0 = off.
    kafka_statistics_interval_ms: int = Field(default=5_000, ge=0)


class HealthSettings(Section):
    # /livez fails when the poll loop has not turned for this long (a wedged loop
    # cannot keep its partitions alive, so the pod must restart) ...
    poll_stall_s: float = Field(default=60.0, gt=0)
    # ... or when one batch has been in the handler this long: a multiple of the worst
    # expected batch (a 2,000-page render, a GPU batch), so only a hung handler trips it.
    max_batch_s: float = Field(default=900.0, gt=0)
    # The API's /health reports background checks of Kafka and Qdrant, refreshed this
    # often; each check gives up after check_timeout_s.
    check_interval_s: float = Field(default=5.0, gt=0)
    check_timeout_s: float = Field(default=3.0, gt=0)


class LogSettings(Section):
    # "auto": text on a terminal, JSON otherwise (pods, pipes, files).
    format: Literal["auto", "json", "text"] = "auto"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, BaseModel):
            value = value.model_dump()
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class ColstreamSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="COLSTREAM_",
        env_nested_delimiter="__",
        extra="ignore",
        populate_by_name=True,
        frozen=True,
        # Validation errors must never print what was given: keys and secrets live here.
        hide_input_in_errors=True,
    )

    state_dir: Path = Field(default_factory=default_state_dir)
    # Consumer groups are "<prefix>splitter", "<prefix>embedder", "<prefix>sink".
    consumer_group_prefix: str = "colstream-"
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    blob: BlobSettings = Field(default_factory=BlobSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    converter: ConverterSettings = Field(default_factory=ConverterSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    qdrant: QdrantSettings = Field(default_factory=QdrantSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    eventgrid: EventGridSettings = Field(default_factory=EventGridSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    splitter: SplitterSettings = Field(default_factory=SplitterSettings)
    embedder: EmbedderSettings = Field(default_factory=EmbedderSettings)
    sink: SinkSettings = Field(default_factory=SinkSettings)
    page_images: PageImageSettings = Field(default_factory=PageImageSettings)
    shutdown: ShutdownSettings = Field(default_factory=ShutdownSettings)
    gc: GcSettings = Field(default_factory=GcSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    # Unprefixed names that win: see module docstring.
    kafka_bootstrap_servers: str | None = Field(
        default=None, validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS")
    )
    qdrant_url: str | None = Field(default=None, validation_alias=AliasChoices("QDRANT_URL"))
    qdrant_api_key: SecretStr | None = Field(default=None, validation_alias=AliasChoices("QDRANT_API_KEY"))

    def model_post_init(self, __context: Any) -> None:
        # Fold the well-known variables into their sections once, at construction, and
        # clear them so that :meth:`updated` never re-applies them over a change.
        if self.kafka_bootstrap_servers:
            self._fold("kafka", bootstrap_servers=self.kafka_bootstrap_servers)
        if self.qdrant_url:
            self._fold("qdrant", url=self.qdrant_url)
        if self.qdrant_api_key is not None:
            self._fold("qdrant", api_key=self.qdrant_api_key)
        for name in ("kafka_bootstrap_servers", "qdrant_url", "qdrant_api_key"):
            object.__setattr__(self, name, None)

    def _fold(self, section: str, **values: Any) -> None:
        object.__setattr__(self, section, getattr(self, section).model_copy(update=values))

    def updated(self, **changes: Any) -> Self:
        """A new frozen settings object with ``changes`` merged in, section by section,
        e.g. ``settings.updated(kafka={"linger_ms": 5}, state_dir=path)``. Values are
        validated like the environment's; the environment is not read again."""
        return self.model_validate(_merge(self.model_dump(), changes))


@lru_cache(maxsize=1)
def get_settings() -> ColstreamSettings:
    return ColstreamSettings()
