"""Removing the blobs colstream owns once nothing needs them, and expiring tombstone records.

Owned blobs are the ones colstream wrote itself (:mod:`colstream.infra.blob_names`):
API and CLI uploads under ``uploads/<document dir>/`` and claim-check page images
under ``claims/<document dir>/v<version>/``, in the local blob root or the
configured Azure upload container. A URI anywhere else (a user's own blob, an
Event Grid blob, a ``file://`` path outside those folders) is never touched.

Two ways they go:

* **The sink** (:class:`BlobJanitor`), right after it has durably applied a batch:
  a delete releases the document's upload blob and all its claim checks; a
  superseding version's older upload blob is released once the newer version
  settles (complete, partial or failed), and each settled version's claim checks
  with it. Releases are best effort: one that fails, or is lost in a restart, is
  left to the sweeper.
* **The sweeper** (``colstream gc``, also a Kubernetes CronJob), from the sink's
  records and a listing of the owned blobs (:func:`plan_sweep` is the pure rule):

  - an upload blob that is the current blob of a live record stays; of a failed
    record, it stays ``gc.failed_retention_s`` after the failure (for a redrive);
  - any other owned blob (superseded, deleted, a refused or never-landed
    publish) goes once it is ``gc.orphan_min_age_s`` old, so an upload still on its
    way through the pipeline is never taken;
  - claim checks go once their version is settled or superseded (and stay while
    their version is indexing, or while no record exists yet, up to the orphan age);
  - ``deleted`` records go once older than the uploads topic's
    ``delete.retention.ms`` (``topics.uploads_delete_retention_ms``): by then the
    tombstone itself may be compacted away, and the record would only grow the store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from colstream.infra.blob_names import CLAIMS_PREFIX, UPLOADS_PREFIX, claim_blob_dir, document_blob_dir
from colstream.infra.settings import BlobSettings, ColstreamSettings, GcSettings
from colstream.schemas.events import DocumentRecord

log = logging.getLogger(__name__)

OWNED_PREFIXES = (UPLOADS_PREFIX, CLAIMS_PREFIX)
_CLAIM_VERSION = re.compile(r"^v(\d+)$")


@dataclass(frozen=True)
class OwnedBlob:
    name: str  # relative to the local root or the upload container: uploads/... or claims/...
    uri: str
    modified_at: datetime

    @property
    def document_dir(self) -> str:
        return self.name.split("/", 2)[1] if self.name.count("/") >= 2 else ""

    @property
    def claim_version(self) -> int | None:
        parts = self.name.split("/")
        if self.name.startswith(CLAIMS_PREFIX) and len(parts) >= 4:
            match = _CLAIM_VERSION.match(parts[2])
            return int(match.group(1)) if match else None
        return None


# ----------------------------------------------------------------------------- the rule


@dataclass
class SweepPlan:
    delete: list[OwnedBlob] = field(default_factory=list)
    keep: int = 0
    expire_records: list[str] = field(default_factory=list)


def plan_sweep(
    blobs: Iterable[OwnedBlob],
    records: Iterable[DocumentRecord],
    *,
    now: datetime,
    gc: GcSettings,
    delete_retention: timedelta,
    owned_name: Any,
) -> SweepPlan:
    """What to remove. ``owned_name(uri)`` maps a record's blob URI to an owned name, or None."""
    plan = SweepPlan()
    by_dir: dict[str, DocumentRecord] = {}
    current: dict[str, DocumentRecord] = {}
    for record in records:
        by_dir[document_blob_dir(record.document_id).removeprefix(UPLOADS_PREFIX)] = record
        if record.blob_uri and (name := owned_name(record.blob_uri)):
            current[name] = record
        if record.state == "deleted" and now - record.updated_at >= delete_retention:
            plan.expire_records.append(record.document_id)
    orphan_age = timedelta(seconds=gc.orphan_min_age_s)
    failed_retention = timedelta(seconds=gc.failed_retention_s)
    for blob in blobs:
        age = now - blob.modified_at
        holder = current.get(blob.name)
        if blob.name.startswith(UPLOADS_PREFIX):
            if holder is not None and holder.state == "failed":
                drop = now - holder.updated_at >= failed_retention and age >= orphan_age
            elif holder is not None and holder.state != "deleted":
                drop = False
            else:
                drop = age >= orphan_age
        else:
            owner = by_dir.get(blob.document_dir)
            version = blob.claim_version
            if owner is None or version is None:
                drop = age >= orphan_age
            else:
                drop = version < owner.version or (version == owner.version and owner.state != "indexing")
        if drop:
            plan.delete.append(blob)
        else:
            plan.keep += 1
    return plan


# ----------------------------------------------------------------------------- where blobs are


class OwnedStore(Protocol):
    def owned_name(self, uri: str) -> str | None: ...

    def list_owned(self, prefix: str = "") -> Iterator[OwnedBlob]: ...

    def remove(self, blob: OwnedBlob) -> None: ...


class LocalOwnedStore:
    """Owned blobs under ``blob.local_root``."""

    def __init__(self, settings: BlobSettings) -> None:
        self.root = Path(os.path.realpath(settings.local_root))

    def owned_name(self, uri: str) -> str | None:
        if not uri.startswith("file://"):
            return None
        from urllib.parse import urlsplit
        from urllib.request import url2pathname

        path = Path(os.path.realpath(url2pathname(urlsplit(uri).path)))
        try:
            name = path.relative_to(self.root).as_posix()
        except ValueError:
            return None
        return name if name.startswith(OWNED_PREFIXES) else None

    def list_owned(self, prefix: str = "") -> Iterator[OwnedBlob]:
        for top in OWNED_PREFIXES:
            base = self.root / top
            if not base.is_dir():
                continue
            for directory, _dirs, files in os.walk(base):
                for file_name in files:
                    path = Path(directory) / file_name
                    name = path.relative_to(self.root).as_posix()
                    if not name.startswith(prefix) or file_name.startswith(".incoming-"):
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        modified = datetime.fromtimestamp(path.stat().st_mtime, UTC)
                        yield OwnedBlob(name, path.as_uri(), modified)

    def remove(self, blob: OwnedBlob) -> None:
        path = self.root / blob.name
        path.unlink(missing_ok=True)
        # Empty directories up to (not including) uploads/ or claims/ go too.
        parent = path.parent
        while parent != self.root and parent.name not in ("uploads", "claims") and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def remove_tree(self, prefix: str) -> None:
        shutil.rmtree(self.root / prefix, ignore_errors=True)


class AzureOwnedStore:
    """Owned blobs in the Azure upload container (``blob.azure_upload_container``)."""

    def __init__(self, settings: BlobSettings, blob_store: Any) -> None:
        from colstream.infra.blobstore import effective_endpoints, upload_account

        self.settings = settings
        self.blob_store = blob_store
        self.container = settings.azure_upload_container
        self.account = upload_account(settings)
        if self.account is None or self.container is None:
            raise ValueError("no Azure upload account and container to collect in")
        self.endpoint = effective_endpoints(settings).get(self.account, f"https://{self.account}.blob.core.windows.net")

    def owned_name(self, uri: str) -> str | None:
        from colstream.infra.blobstore import AzureBlob, BlobError, resolve_blob_uri

        try:
            location = resolve_blob_uri(uri, self.settings)
        except BlobError:
            return None
        if not isinstance(location, AzureBlob):
            return None
        if (location.account, location.container) != (self.account, self.container):
            return None
        return location.blob if location.blob.startswith(OWNED_PREFIXES) else None

    def _container(self) -> Any:
        return self.blob_store._service_client(self.account, self.endpoint).get_container_client(self.container)

    def list_owned(self, prefix: str = "") -> Iterator[OwnedBlob]:
        container = self._container()
        for top in OWNED_PREFIXES:
            start = prefix if prefix.startswith(top) else top
            if prefix and not prefix.startswith(top):
                continue
            for item in container.list_blobs(name_starts_with=start):
                uri = f"{self.endpoint}/{self.container}/{quote(item.name, safe='/')}"
                yield OwnedBlob(item.name, uri, item.last_modified)

    def remove(self, blob: OwnedBlob) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        with contextlib.suppress(ResourceNotFoundError):
            self._container().delete_blob(blob.name)

    def remove_tree(self, prefix: str) -> None:
        for blob in self.list_owned(prefix + "/"):
            self.remove(blob)


def open_owned_store(settings: ColstreamSettings, blob_store: Any | None = None) -> OwnedStore:
    if settings.blob.azure_upload_container:
        from colstream.infra.blobstore import open_blob_store

        return AzureOwnedStore(settings.blob, blob_store or open_blob_store(settings))
    return LocalOwnedStore(settings.blob)


# ----------------------------------------------------------------------------- the sink's side


class BlobJanitor:
    """What the sink releases once it has durably applied a batch. Best effort, never raises."""

    def __init__(self, store: OwnedStore, max_pending: int = 100_000) -> None:
        self.store = store
        self.max_pending = max_pending
        # document_id -> superseded upload URIs, released when a newer version settles
        self._pending: OrderedDict[str, set[str]] = OrderedDict()

    def superseded(self, document_id: str, uris: Iterable[str]) -> None:
        owned = {uri for uri in uris if self.store.owned_name(uri)}
        if not owned:
            return
        self._pending.setdefault(document_id, set()).update(owned)
        self._pending.move_to_end(document_id)
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)  # left to the sweeper

    def settled(self, record: DocumentRecord) -> None:
        """``record`` is durable and settled: release what it no longer needs."""
        try:
            keep = record.blob_uri if record.state != "deleted" else None
            for uri in self._pending.pop(record.document_id, set()):
                if uri != keep:
                    self._remove_uri(uri)
            if record.state == "deleted":
                if record.blob_uri:
                    self._remove_uri(record.blob_uri)
                document_dir = document_blob_dir(record.document_id).removeprefix(UPLOADS_PREFIX)
                self._remove_tree(f"{CLAIMS_PREFIX}{document_dir}")
            else:
                for version in self._claim_versions(record.document_id, record.version):
                    self._remove_tree(claim_blob_dir(record.document_id, version))
        except Exception:
            log.warning("releasing the blobs of %s failed; `colstream gc` will", record.document_id, exc_info=True)

    def _claim_versions(self, document_id: str, up_to: int) -> list[int]:
        document_dir = document_blob_dir(document_id).removeprefix(UPLOADS_PREFIX)
        versions = {
            blob.claim_version for blob in self.store.list_owned(f"{CLAIMS_PREFIX}{document_dir}/")
        }
        return sorted(v for v in versions if v is not None and v <= up_to)

    def _remove_uri(self, uri: str) -> None:
        name = self.store.owned_name(uri)
        if name is not None:
            self.store.remove(OwnedBlob(name, uri, datetime.now(UTC)))

    def _remove_tree(self, prefix: str) -> None:
        remove_tree = getattr(self.store, "remove_tree", None)
        if callable(remove_tree):
            remove_tree(prefix)


# ----------------------------------------------------------------------------- the sweeper


class RecordStore(Protocol):
    def list_records(self) -> list[DocumentRecord]: ...

    def delete_records(self, document_ids: Sequence[str]) -> None: ...


@dataclass
class SweepReport:
    deleted_blobs: int
    kept_blobs: int
    expired_records: int
    dry_run: bool
    deleted: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "deleted_blobs": self.deleted_blobs,
            "kept_blobs": self.kept_blobs,
            "expired_records": self.expired_records,
            "dry_run": self.dry_run,
        }


def sweep(
    settings: ColstreamSettings,
    records: RecordStore,
    owned: OwnedStore,
    *,
    now: datetime | None = None,
    dry_run: bool = False,
) -> SweepReport:
    """One pass of the retention sweeper."""
    plan = plan_sweep(
        owned.list_owned(),
        records.list_records(),
        now=now or datetime.now(UTC),
        gc=settings.gc,
        delete_retention=timedelta(milliseconds=settings.topics.uploads_delete_retention_ms),
        owned_name=owned.owned_name,
    )
    if not dry_run:
        for blob in plan.delete:
            try:
                owned.remove(blob)
            except Exception:
                log.warning("gc: could not remove %s", blob.name, exc_info=True)
        if plan.expire_records:
            records.delete_records(plan.expire_records)
    return SweepReport(
        deleted_blobs=len(plan.delete),
        kept_blobs=plan.keep,
        expired_records=len(plan.expire_records),
        dry_run=dry_run,
        deleted=[blob.name for blob in plan.delete],
    )
