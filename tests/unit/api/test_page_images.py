"""Page images: the disk LRU, rendering at a width, and the route's keys, tenants and versions.

The blob store is the real local one under tmp_path and rendering is the real
render core in a child process; the records store is an in-memory fake.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from colstream.api.app import create_app
from colstream.api.page_images import PageImageCache
from colstream.api.page_render import render_in_child, render_page_image
from colstream.infra.blobstore import BlobStore
from colstream.infra.settings import ColstreamSettings
from colstream.schemas.events import DocumentRecord
from tests.fixtures.docs import make_image, make_pdf

READER = "r" * 32
ACME = "a" * 32
ADMIN = "z" * 32


class RecordsOnly:
    def __init__(self) -> None:
        self.records: dict[str, DocumentRecord] = {}

    def list_records(self) -> list[DocumentRecord]:
        return list(self.records.values())

    def get_records(self, document_ids: Sequence[str]) -> dict[str, DocumentRecord]:
        return {d: self.records[d] for d in document_ids if d in self.records}

    def stats(self) -> dict[str, Any]:
        return {}

    def count_pages(self, document_id: str | None = None) -> int:
        return 0

    def search(self, *args: Any, **kwargs: Any) -> list[tuple[float, dict[str, Any]]]:
        return []


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# ----------------------------------------------------------------------------- cache


def test_cache_evicts_least_recently_used_past_its_byte_bound(tmp_path: Path) -> None:
    cache = PageImageCache(tmp_path / "c", max_bytes=2500)
    for page in (1, 2):
        cache.put("doc", 3, page, 100, "webp", bytes([page]) * 1000)
    assert cache.get("doc", 3, 1, 100, "webp") == b"\x01" * 1000  # page 1 is now the most recent
    cache.put("doc", 3, 3, 100, "webp", b"\x03" * 1000)
    assert cache.get("doc", 3, 2, 100, "webp") is None
    assert cache.get("doc", 3, 1, 100, "webp") is not None and cache.get("doc", 3, 3, 100, "webp") is not None
    assert cache.total_bytes == 2000
    assert sum(p.stat().st_size for p in (tmp_path / "c").rglob("*") if p.is_file()) == 2000
    # bigger than the whole bound: served, never stored
    cache.put("doc", 3, 4, 100, "webp", b"x" * 3000)
    assert cache.get("doc", 3, 4, 100, "webp") is None


def test_cache_keeps_its_recency_order_across_a_restart(tmp_path: Path) -> None:
    cache = PageImageCache(tmp_path, max_bytes=10_000)
    for page in (1, 2, 3):
        cache.put("doc", 1, page, 100, "jpeg", b"p" * 1000)
        path = cache.path_for("doc", 1, page, 100, "jpeg")
        os.utime(path, ns=(page * 10**9, page * 10**9))
    reopened = PageImageCache(tmp_path, max_bytes=2000)  # over the bound at start: the oldest goes
    assert reopened.get("doc", 1, 1, 100, "jpeg") is None
    assert reopened.get("doc", 1, 2, 100, "jpeg") is not None
    assert reopened.total_bytes == 2000


def test_dropping_older_versions_keeps_the_current_one(tmp_path: Path) -> None:
    cache = PageImageCache(tmp_path, max_bytes=10_000)
    cache.put("doc", 1, 1, 100, "webp", b"old")
    cache.put("doc", 5, 1, 100, "webp", b"new")
    assert cache.drop_document("doc", below_version=5) == 1
    assert cache.get("doc", 1, 1, 100, "webp") is None and cache.get("doc", 5, 1, 100, "webp") == b"new"
    cache.drop_document("doc")
    assert cache.total_bytes == 0 and not any(tmp_path.rglob("*.webp"))


# ----------------------------------------------------------------------------- rendering


def test_a_portrait_page_renders_at_exactly_the_width_and_a_landscape_one_is_narrowed(tmp_path: Path) -> None:
    limits = ColstreamSettings().limits
    portrait = tmp_path / "p.pdf"
    portrait.write_bytes(make_pdf(2, size=(612, 792)))
    image = render_page_image(portrait, 2, 300, "webp", limits)
    assert decoded(image.data).format == "WEBP" and (image.width, image.height) == (300, 388)
    landscape = tmp_path / "l.pdf"
    landscape.write_bytes(make_pdf(1, size=(792, 612)))
    image = render_page_image(landscape, 1, 300, "jpeg", limits)
    assert decoded(image.data).format == "JPEG" and image.width == 300 and image.height == 232


def test_a_small_raster_image_is_never_enlarged(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    path.write_bytes(make_image("PNG", (120, 90)))
    image = render_page_image(path, 1, 800, "webp", ColstreamSettings().limits)
    assert (image.width, image.height) == (120, 90)


@pytest.mark.slow  # two render child processes
def test_a_child_render_reports_the_render_cores_refusal(tmp_path: Path) -> None:
    from colstream.api.page_render import PageImageError

    path = tmp_path / "two.pdf"
    path.write_bytes(make_pdf(2))
    image = render_in_child(path, 1, 200, "webp", ColstreamSettings().limits, timeout_s=30)
    assert image.width == 200
    with pytest.raises(PageImageError) as refused:
        render_in_child(path, 3, 200, "webp", ColstreamSettings().limits, timeout_s=30)
    assert refused.value.error_type == "NoSuchPage"


# ----------------------------------------------------------------------------- the route


@pytest.fixture
def served(tmp_path: Path) -> tuple[TestClient, RecordsOnly, Any, ColstreamSettings]:
    keys = [
        {"key": READER, "scopes": ["read"]},
        {"key": ACME, "scopes": ["read"], "tenant": "acme"},
        {"key": ADMIN, "scopes": ["admin"]},
    ]
    settings = ColstreamSettings().updated(
        state_dir=tmp_path,
        blob={"local_root": tmp_path / "blobs"},
        api={"keys": keys},
        page_images={"max_width": 1000, "cache_dir": tmp_path / "cache"},
    )
    (tmp_path / "blobs").mkdir()
    store = RecordsOnly()
    blobs = BlobStore(settings.blob)
    app = create_app(settings, store=store, blob_store=blobs, publisher=object(),  # type: ignore[arg-type]
                     kafka_probe=lambda: True, mount_eventgrid=False)
    client = TestClient(app)
    return client, store, app, settings


def store_document(store: RecordsOnly, settings: ColstreamSettings, document_id: str, version: int,
                   pdf: bytes, tenant: str | None = None, state: str = "complete") -> None:
    path = settings.blob.local_root / f"{document_id.replace('/', '_')}-v{version}.pdf"
    path.write_bytes(pdf)
    store.records[document_id] = DocumentRecord(
        document_id=document_id, version=version, state=state, blob_uri=path.resolve().as_uri(),  # type: ignore[arg-type]
        total_pages=2, indexed_pages=[1, 2], metadata={"tenant": tenant} if tenant else None,
    )


def images_of(app: Any) -> Any:
    route = next(r for r in app.routes if getattr(r, "path", "").endswith("/pages/{page_number}/image"))
    return route.endpoint


@pytest.mark.slow  # the route renders each page in a child process
def test_the_route_renders_once_then_serves_from_the_cache(served: Any) -> None:
    client, store, _app, settings = served
    store_document(store, settings, "reports/q3", 7, make_pdf(2))
    url = "/documents/reports/q3/pages/2/image?width=240"
    first = client.get(url, headers={"X-API-Key": READER})
    assert first.status_code == 200 and first.headers["content-type"] == "image/webp"
    assert decoded(first.content).size[0] == 240
    cached = list((settings.page_images.cache_dir).rglob("v7-p2-w240.webp"))
    assert len(cached) == 1
    # the blob is gone: only the cache can answer now
    Path(store.records["reports/q3"].blob_uri.removeprefix("file://")).unlink()
    again = client.get(url, headers={"Authorization": f"Bearer {READER}"})
    assert again.status_code == 200 and again.content == first.content
    assert client.get(url, headers={"X-API-Key": READER, "If-None-Match": first.headers["etag"]}).status_code == 304


@pytest.mark.slow  # the route renders each page in a child process
def test_a_reupload_never_serves_the_old_pages_and_a_delete_serves_none(served: Any) -> None:
    client, store, _app, settings = served
    auth = {"X-API-Key": READER}
    store_document(store, settings, "doc", 1, make_pdf(2, size=(612, 792)))
    old = client.get("/documents/doc/pages/1/image?width=200", headers=auth)
    assert decoded(old.content).size == (200, 259)
    store_document(store, settings, "doc", 9, make_pdf(2, size=(792, 612)))  # same id, new version
    new = client.get("/documents/doc/pages/1/image?width=200", headers=auth)
    assert new.status_code == 200 and decoded(new.content).size[0] == 200
    assert decoded(new.content).size[1] in (154, 155)  # landscape now
    assert new.headers["etag"] != old.headers["etag"]
    names = sorted(p.name for p in settings.page_images.cache_dir.rglob("*.webp"))
    assert names == ["v9-p1-w200.webp"]
    store.records["doc"] = store.records["doc"].model_copy(update={"state": "deleted", "version": 12})
    gone = client.get("/documents/doc/pages/1/image?width=200", headers=auth)
    assert gone.status_code == 404
    assert not list(settings.page_images.cache_dir.rglob("*.webp"))


@pytest.mark.slow  # the route renders each page in a child process
def test_keys_scopes_and_tenants(served: Any) -> None:
    client, store, _app, settings = served
    store_document(store, settings, "theirs", 1, make_pdf(1), tenant="globex")
    store_document(store, settings, "ours", 1, make_pdf(1), tenant="acme")
    url = "/documents/{}/pages/1/image?width=100"
    missing_key = client.get(url.format("ours"))
    assert missing_key.status_code == 401 and "WWW-Authenticate" in missing_key.headers
    assert client.get(url.format("ours"), headers={"X-API-Key": "x" * 32}).status_code == 401
    assert client.get(url.format("ours"), headers={"X-API-Key": ACME}).status_code == 200
    hidden = client.get(url.format("theirs"), headers={"X-API-Key": ACME})
    absent = client.get(url.format("never-was"), headers={"X-API-Key": ACME})
    assert hidden.status_code == absent.status_code == 404
    assert hidden.json()["detail"].replace("theirs", "X") == absent.json()["detail"].replace("never-was", "X")
    assert client.get(url.format("theirs"), headers={"X-API-Key": ADMIN}).status_code == 200


@pytest.mark.slow  # the route renders each page in a child process
def test_bad_requests_are_refused_with_a_reason(served: Any) -> None:
    client, store, _app, settings = served
    store_document(store, settings, "doc", 1, make_pdf(2))
    auth = {"X-API-Key": READER}
    too_wide = client.get("/documents/doc/pages/1/image?width=5000", headers=auth)
    assert too_wide.status_code == 400 and "1000" in too_wide.json()["detail"]
    assert client.get("/documents/doc/pages/3/image", headers=auth).status_code == 404
    assert client.get("/documents/doc/pages/0/image", headers=auth).status_code == 404
    jpeg = client.get("/documents/doc/pages/1/image?format=jpeg", headers=auth)
    assert jpeg.headers["content-type"] == "image/jpeg" and decoded(jpeg.content).size[0] == 800
    # the document route still answers for the same id
    assert client.get("/documents/doc", headers=auth).status_code in (200, 401)


def test_the_console_shell_is_public_and_its_data_is_not(served: Any) -> None:
    client = served[0]
    page = client.get("/")
    assert page.status_code == 200 and 'data-auth-required="true"' in page.text
    assert client.get("/console/assets/console.js").status_code == 200
    assert client.get("/console/assets/../app.py").status_code == 404
    assert client.get("/console/session").status_code == 401
    assert client.get("/console/events").status_code == 401
    assert client.get("/dead-letters", headers={"X-API-Key": READER}).status_code == 403
    session = client.get("/console/session", headers={"X-API-Key": ACME}).json()
    assert session["tenant"] == "acme" and session["scopes"] == ["read"]
    assert json.dumps(session).count(ACME) == 0


def test_the_console_bundle_stays_under_200_kb() -> None:
    from colstream.api.console import ASSETS, STATIC_DIR

    served_files = ["index.html", *ASSETS]
    assert sorted(p.name for p in STATIC_DIR.iterdir() if p.is_file()) == sorted(served_files)
    total = sum((STATIC_DIR / name).stat().st_size for name in served_files)
    assert total < 200 * 1024, f"console bundle is {total} bytes"


NO_SOFFICE = "LibreOffice is not installed (scripts/bootstrap.sh installs it)"


@pytest.mark.slow  # a LibreOffice conversion
@pytest.mark.skipif(shutil.which("soffice") is None, reason=NO_SOFFICE)
def test_an_office_document_is_converted_once_and_its_pages_are_served(served: Any) -> None:
    from tests.fixtures.office import make_docx

    client, store, _app, settings = served
    store_document(store, settings, "memo.docx", 3, make_docx(2))
    auth = {"X-API-Key": READER}
    first = client.get("/documents/memo.docx/pages/1/image?width=300", headers=auth)
    second = client.get("/documents/memo.docx/pages/2/image?width=300", headers=auth)
    assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
    assert decoded(first.content).size[0] == 300 and first.content != second.content
    converted = list(settings.page_images.cache_dir.with_name("cache-converted").glob("*-v3.pdf"))
    assert len(converted) == 1  # both pages came from one conversion
    # a file that is no document at all is refused with the reason, not a 5xx
    store_document(store, settings, "noise", 1, b"\x00\x01 definitely not a document " * 40)
    refused = client.get("/documents/noise/pages/1/image?width=300", headers=auth)
    assert refused.status_code == 422 and "UnsupportedFormat" in refused.json()["detail"]
