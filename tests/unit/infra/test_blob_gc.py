"""Blobs colstream owns leave the disk when nothing needs them; a user's blobs never do.

The sink is the real :class:`SinkHandler` on an in-memory page store and the real
local blob store under ``tmp_path``; each test looks at the files on disk after a
delete, a re-upload and a failure. The sweeper (``colstream gc``) is checked on
the same disk, and its rule (:func:`plan_sweep`) on its own.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from colstream.consumers.sink.stage import SinkHandler
from colstream.infra.blob_gc import LocalOwnedStore, OwnedBlob, plan_sweep, sweep
from colstream.infra.blob_names import claim_blob_dir, upload_blob_name
from colstream.infra.blobstore import BlobStore
from colstream.infra.kafka import RecordPosition
from colstream.infra.settings import ColstreamSettings, GcSettings
from colstream.infra.stage_failures import RawRecord
from colstream.schemas import DocumentDeleted, DocumentFailed, DocumentRecord, DocumentRef, PageVectors, encode
from tests.unit.consumers.sink.test_core import MemoryPages


class Store(MemoryPages):
    def list_records(self) -> list[DocumentRecord]:
        return list(self.records.values())

    def delete_records(self, document_ids: Sequence[str]) -> None:
        for document_id in document_ids:
            self.records.pop(document_id, None)

    def close(self) -> None:
        pass


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "blobs"
        self.settings = ColstreamSettings(state_dir=tmp_path).updated(blob={"local_root": self.root})
        self.blobs = BlobStore(self.settings.blob)
        self.store = Store()
        self.sink = SinkHandler(self.settings, self.store, dim=128)  # type: ignore[arg-type]
        self.offset = 0

    def upload(self, document_id: str, version: int, pages: int = 1, claims: bool = True) -> str:
        uri = self.blobs.put_bytes(upload_blob_name(document_id, "report.pdf"), b"%%PDF-1.4 v%d" % version)
        if claims:
            for page in range(1, pages + 1):
                self.blobs.put_bytes(f"{claim_blob_dir(document_id, version)}/page-{page}.png", b"png")
        return uri

    def feed(self, *messages: object) -> None:
        records = []
        for message in messages:
            self.offset += 1
            records.append(RawRecord(None, encode(message), RecordPosition("documents.vectors", 0, self.offset)))
        self.sink.write(records)

    def pages(self, document_id: str, version: int, uri: str | None, total: int = 1) -> list[PageVectors]:
        ref = DocumentRef(document_id=document_id, version=version, filename="report.pdf", blob_uri=uri)
        rng = np.random.default_rng(version)
        return [PageVectors.from_array(document=ref, page_number=page, total_pages=total, model="m",
                                       array=rng.normal(size=(4, 128)).astype(np.float32))
                for page in range(1, total + 1)]

    def files(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_a_delete_removes_the_uploaded_blob_and_its_claim_checks(world: World) -> None:
    uri = world.upload("doc", 1, pages=2)
    world.feed(*world.pages("doc", 1, uri, total=2))
    assert world.store.records["doc"].state == "complete"
    # settled: the claim checks are not needed any more, the upload is (it is the document)
    assert [f for f in world.files() if f.startswith("claims/")] == []
    assert [f for f in world.files() if f.startswith("uploads/")] != []
    world.feed(DocumentDeleted(document=DocumentRef(document_id="doc", version=5)))
    assert world.store.records["doc"].state == "deleted"
    assert world.files() == []


def test_a_reupload_removes_the_superseded_blob_once_the_new_version_settles(world: World) -> None:
    first = world.upload("doc", 1)
    world.feed(*world.pages("doc", 1, first))
    second = world.upload("doc", 2, pages=2)
    pages = world.pages("doc", 2, second, total=2)
    world.feed(pages[0])  # the new version is still indexing: the old blob stays until it settles
    assert Path(LocalOwnedStore(world.settings.blob).root / world.sink.janitor.store.owned_name(first)).exists()  # type: ignore[operator]
    world.feed(pages[1])
    uploads = [f for f in world.files() if f.startswith("uploads/")]
    assert len(uploads) == 1 and world.blobs.get_bytes(second, 100) == b"%PDF-1.4 v2"
    assert not any(f.startswith("claims/") for f in world.files())


def test_a_failed_upload_keeps_its_blob_for_a_redrive_and_the_sweeper_takes_it_later(world: World) -> None:
    uri = world.upload("doc", 1, claims=False)
    ref = DocumentRef(document_id="doc", version=1, filename="report.pdf", blob_uri=uri)
    world.feed(DocumentFailed(document=ref, stage="splitter", error_type="BrokenDocument", message="bad xref"))
    assert world.store.records["doc"].state == "failed" and len(world.files()) == 1
    soon = sweep(world.settings, world.store, LocalOwnedStore(world.settings.blob))
    assert soon.deleted_blobs == 0 and len(world.files()) == 1
    later = datetime.now(UTC) + timedelta(seconds=world.settings.gc.failed_retention_s + 60)
    report = sweep(world.settings, world.store, LocalOwnedStore(world.settings.blob), now=later)
    assert report.deleted_blobs == 1 and world.files() == []


def test_a_users_own_blob_is_never_touched(world: World, tmp_path: Path) -> None:
    mine = world.root / "mine" / "report.pdf"  # under the blob root, not in a folder colstream owns
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"%PDF-1.4 mine")
    elsewhere = tmp_path / "elsewhere.pdf"
    elsewhere.write_bytes(b"%PDF-1.4 elsewhere")
    for uri in (mine.as_uri(), elsewhere.as_uri()):
        world.feed(*world.pages(uri.rsplit("/", 1)[-1], 1, uri))
    world.feed(DocumentDeleted(document=DocumentRef(document_id="report.pdf", version=9)),
               DocumentDeleted(document=DocumentRef(document_id="elsewhere.pdf", version=9)))
    far = datetime.now(UTC) + timedelta(days=365)
    sweep(world.settings, world.store, LocalOwnedStore(world.settings.blob), now=far)
    assert mine.read_bytes() == b"%PDF-1.4 mine" and elsewhere.exists()


def test_the_sweeper_removes_orphans_only_once_they_are_old(world: World) -> None:
    live = world.upload("live", 1, claims=False)
    world.feed(*world.pages("live", 1, live))
    world.upload("never-published", 1)  # a refused or never-landed publish, claim checks and all
    owned = LocalOwnedStore(world.settings.blob)
    assert sweep(world.settings, world.store, owned).deleted_blobs == 0  # young: maybe still in flight
    old = time.time() - world.settings.gc.orphan_min_age_s - 60
    for path in world.root.rglob("*"):
        if path.is_file():
            os.utime(path, (old, old))
    dry = sweep(world.settings, world.store, owned, dry_run=True)
    assert dry.deleted_blobs == 2 and len(world.files()) == 3
    report = sweep(world.settings, world.store, owned)
    assert report.deleted_blobs == 2
    assert world.files() == [owned.owned_name(live)]


def test_tombstone_records_expire_after_the_uploads_topics_delete_retention(world: World) -> None:
    uri = world.upload("doc", 1, claims=False)
    world.feed(*world.pages("doc", 1, uri))
    world.feed(DocumentDeleted(document=DocumentRef(document_id="doc", version=3)))
    owned = LocalOwnedStore(world.settings.blob)
    assert sweep(world.settings, world.store, owned).expired_records == 0
    assert world.store.records["doc"].state == "deleted"
    retention = timedelta(milliseconds=world.settings.topics.uploads_delete_retention_ms)
    later = datetime.now(UTC) + retention + timedelta(minutes=1)
    assert sweep(world.settings, world.store, owned, now=later).expired_records == 1
    assert "doc" not in world.store.records


def test_plan_sweep_keeps_claims_of_a_version_still_indexing() -> None:
    now = datetime.now(UTC)
    records = [DocumentRecord(document_id="d", version=4, state="indexing", total_pages=2, indexed_pages=[1])]
    blobs = [OwnedBlob(f"{claim_blob_dir('d', v)}/page-1.png", f"file:///x/{v}", now) for v in (3, 4)]
    plan = plan_sweep(blobs, records, now=now, gc=GcSettings(), delete_retention=timedelta(days=1),
                      owned_name=lambda uri: None)
    assert [b.claim_version for b in plan.delete] == [3] and plan.keep == 1
