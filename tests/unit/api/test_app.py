"""REST API against in-memory fakes of the store, publisher and model.

The blob store is the real local one (under tmp_path); Kafka and Qdrant are
faked here because this level checks the HTTP contract: shapes, status codes,
and that waiting follows the sink's record to the published version.
"""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from colstream.api.app import create_app
from colstream.api.content import RejectedInput, clean_filename
from colstream.api.images import EmbedImageDecoder
from colstream.api.progress import delete_applied, upload_finished
from colstream.infra.settings import ColstreamSettings, LimitSettings, ModelSettings
from colstream.schemas.events import DocumentRecord, UploadEvent, utcnow

PDF_BYTES = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


def png_bytes(width: int = 32, height: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 60)).save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- fakes


@dataclass
class Published:
    topic: str
    key: str
    value: bytes | None
    partition: int | None = 0
    offset: int | None = None


class FakeStore:
    def __init__(self) -> None:
        self.records: dict[str, DocumentRecord] = {}
        self.pages = 0
        self.fail: Exception | None = None
        self.search_calls: list[tuple[np.ndarray, int, str | None, Any]] = []
        self.count_calls: list[Any] = []
        self.search_results: list[tuple[float, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def _check(self) -> None:
        if self.fail is not None:
            raise self.fail

    def put(self, record: DocumentRecord) -> None:
        with self.lock:
            self.records[record.document_id] = record

    def list_records(self) -> list[DocumentRecord]:
        self._check()
        with self.lock:
            return list(self.records.values())

    def get_records(self, document_ids: Sequence[str]) -> dict[str, DocumentRecord]:
        self._check()
        with self.lock:
            return {d: self.records[d] for d in document_ids if d in self.records}

    def stats(self) -> dict[str, Any]:
        self._check()
        return {
            "collection_name": "colpali_embeddings",
            "total_vectors": self.pages,
            "vector_dimension": 128,
            "distance_metric": "COSINE",
            "backend": "fake",
        }

    def count_pages(self, document_id: str | None = None, filter: Any = None) -> int:
        self._check()
        self.count_calls.append(filter)
        return self.pages

    def search(
        self,
        query: np.ndarray,
        limit: int = 10,
        document_id: str | None = None,
        prefetch: bool = True,
        filter: Any = None,
    ) -> list[tuple[float, dict[str, Any]]]:
        self._check()
        self.search_calls.append((query, limit, document_id, filter))
        return self.search_results[:limit]


class FakePublisher:
    """Hands out growing offsets like one partition would, and lets a test play the sink."""

    def __init__(self, first_offset: int = 0) -> None:
        self.next_offset = first_offset
        self.uploads: list[UploadEvent] = []
        self.deletes: list[str] = []
        self.on_upload: Callable[[UploadEvent, int], None] | None = None
        self.on_delete: Callable[[str, int], None] | None = None
        self.fail: Exception | None = None
        self.reachable = True

    def _offset(self) -> int:
        offset, self.next_offset = self.next_offset, self.next_offset + 1
        return offset

    def publish_upload(self, event: UploadEvent) -> Published:
        if self.fail is not None:
            raise self.fail
        offset = self._offset()
        self.uploads.append(event)
        if self.on_upload:
            self.on_upload(event, offset)
        return Published("documents.uploads", event.document_id, event.model_dump_json().encode(), 0, offset)

    def publish_delete(self, document_id: str) -> Published:
        offset = self._offset()
        self.deletes.append(document_id)
        if self.on_delete:
            self.on_delete(document_id, offset)
        return Published("documents.uploads", document_id, None, 0, offset)

    def ping(self) -> bool:
        return self.reachable


@dataclass
class FakeModel:
    model_name: str = "tiny-colqwen2"
    is_random_weights: bool = True
    dim: int = 128
    device: str = "cpu"
    # Rows appended to every output that stand for padding the real model would leave NaN.
    nan_rows: int = 2
    calls: list[str] = field(default_factory=list)

    def _vectors(self, tokens: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        real = rng.standard_normal((tokens, self.dim)).astype(np.float32)
        padding = np.full((self.nan_rows, self.dim), np.nan, dtype=np.float32)
        return np.concatenate([real, padding])

    def embed_images(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        self.calls.append("images")
        # Token count follows the image size so a test can tell images apart.
        return [self._vectors(image.width // 8, image.width) for image in images]

    def embed_queries(self, texts: Sequence[str]) -> list[np.ndarray]:
        self.calls.append("queries")
        return [self._vectors(len(text.split()), len(text)) for text in texts]


def record(document_id: str, version: int, state: str, **extra: Any) -> DocumentRecord:
    values: dict[str, Any] = {
        "document_id": document_id,
        "version": version,
        "state": state,
        "filename": f"{document_id}.pdf",
        "total_pages": 3,
        "indexed_pages": [1, 2, 3] if state == "complete" else [],
        "embedding_dimension": 128,
    }
    values.update(extra)
    return DocumentRecord(**values)


def settle_later(store: FakeStore, make: Callable[[], DocumentRecord], delay_s: float = 0.1) -> None:
    timer = threading.Timer(delay_s, lambda: store.put(make()))
    timer.daemon = True
    timer.start()


@dataclass
class Api:
    client: TestClient
    store: FakeStore
    publisher: FakePublisher
    model: FakeModel
    settings: ColstreamSettings
    loads: list[ModelSettings]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    settings = ColstreamSettings(state_dir=tmp_path).updated(
        blob={"local_root": tmp_path / "blobs"},
        limits={"max_blob_bytes": 64 * 1024, "max_image_pixels": 500 * 500},
    )
    store, publisher, model = FakeStore(), FakePublisher(first_offset=10), FakeModel()
    loads: list[ModelSettings] = []

    def loader(model_settings: ModelSettings) -> FakeModel:
        loads.append(model_settings)
        return model

    app = create_app(
        settings,
        store=store,
        publisher=publisher,
        model_loader=loader,
        stage_stats=lambda: {"sink": {"processed": 7}},
        poll_interval_s=0.02,
        gpu_probe=lambda: False,
    )
    with TestClient(app) as client:
        yield Api(client, store, publisher, model, settings, loads)


def blob_path(uri: str) -> Path:
    return Path(url2pathname(urlparse(uri).path))


# ----------------------------------------------------------------------------- health, stats


def test_health_reports_dependencies_and_stage_stats(api: Api) -> None:
    body = api.client.get("/health").json()
    assert body["status"] == "healthy"
    assert body["kafka_connected"] is True
    assert body["qdrant_connected"] is True
    assert body["model_loaded"] is False
    assert body["gpu_available"] is False
    assert body["stages"] == {"sink": {"processed": 7}}
    assert api.loads == []  # health never loads the model


def test_health_degraded_when_store_or_kafka_unreachable(api: Api) -> None:
    api.store.fail = ConnectionError("qdrant down")
    body = api.client.get("/health").json()
    assert (body["status"], body["qdrant_connected"], body["kafka_connected"]) == ("degraded", False, True)
    api.store.fail = None
    api.publisher.reachable = False
    body = api.client.get("/health").json()
    assert (body["status"], body["qdrant_connected"], body["kafka_connected"]) == ("degraded", True, False)


def test_stats_in_seed_shape(api: Api) -> None:
    api.store.pages = 150
    body = api.client.get("/stats").json()
    assert {k: body[k] for k in ("collection_name", "total_vectors", "vector_dimension", "distance_metric")} == {
        "collection_name": "colpali_embeddings",
        "total_vectors": 150,
        "vector_dimension": 128,
        "distance_metric": "COSINE",
    }


def test_store_failure_is_503(api: Api) -> None:
    api.store.fail = ConnectionError("qdrant down")
    response = api.client.get("/documents")
    assert response.status_code == 503
    assert "qdrant down" in response.json()["detail"]


# ----------------------------------------------------------------------------- documents


def test_documents_lists_live_records_in_seed_shape_plus_state(api: Api) -> None:
    api.store.put(record("b", 4, "complete"))
    api.store.put(record("a", 2, "partial", indexed_pages=[1, 3], failed_pages=[2]))
    api.store.put(record("gone", 9, "deleted", total_pages=0))
    body = api.client.get("/documents").json()
    assert [d["document_id"] for d in body] == ["a", "b"]
    first = body[0]
    assert first["filename"] == "a.pdf"
    assert first["total_pages"] == 3
    assert first["embedding_dimension"] == 128
    assert (first["state"], first["version"], first["indexed_pages"], first["failed_pages"]) == (
        "partial",
        2,
        2,
        [2],
    )
    assert "updated_at" in first


def test_get_document_full_record_and_404s(api: Api) -> None:
    api.store.put(record("contracts/2026/a.pdf", 3, "complete"))
    api.store.put(record("gone", 9, "deleted"))
    found = api.client.get("/documents/contracts/2026/a.pdf")
    assert found.status_code == 200
    assert found.json()["indexed_pages"] == [1, 2, 3]
    assert api.client.get("/documents/nope").status_code == 404
    deleted = api.client.get("/documents/gone")
    assert deleted.status_code == 404
    assert "deleted" in deleted.json()["detail"]


def test_delete_publishes_tombstone_and_accepts(api: Api) -> None:
    api.store.put(record("doc-1", 3, "complete"))
    response = api.client.delete("/document/doc-1")
    assert response.status_code == 202
    assert response.json() == {
        "message": "Document doc-1 deleted successfully",
        "status": "accepted",
        "document_id": "doc-1",
        "version": 10,
    }
    assert api.publisher.deletes == ["doc-1"]


def test_delete_wait_returns_once_sink_applied_the_tombstone(api: Api) -> None:
    api.store.put(record("doc-1", 3, "complete"))
    api.publisher.on_delete = lambda doc, offset: settle_later(
        api.store, lambda: record(doc, offset, "deleted", total_pages=0)
    )
    response = api.client.delete("/document/doc-1", params={"wait": True})
    assert response.status_code == 200
    assert response.json()["status"] == "deleted"
    assert api.store.records["doc-1"].state == "deleted"


def test_delete_wait_times_out_as_accepted(api: Api) -> None:
    api.store.put(record("doc-1", 3, "complete"))
    response = api.client.delete("/document/doc-1", params={"wait": True, "timeout_s": 0.1})
    assert response.status_code == 202
    assert response.json()["status"] == "accepted"


def test_delete_rejects_invalid_document_id(api: Api) -> None:
    assert api.client.delete("/document/a..b").status_code == 422
    assert api.publisher.deletes == []


# ----------------------------------------------------------------------------- ingest


def test_ingest_pdf_without_wait_is_202_and_publishes_stored_blob(api: Api) -> None:
    response = api.client.post(
        "/ingest/pdf",
        params={"wait": False},
        files={"file": ("../../etc/report.pdf", PDF_BYTES, "application/pdf")},
    )
    assert response.status_code == 202
    body = response.json()
    assert (body["status"], body["version"], body["filename"]) == ("accepted", 10, "report.pdf")
    (event,) = api.publisher.uploads
    assert event.document_id == body["document_id"]
    assert len(event.document_id) == 36  # auto uuid4
    assert (event.filename, event.content_type) == ("report.pdf", "application/pdf")
    stored = blob_path(event.blob_uri)
    assert stored.read_bytes() == PDF_BYTES
    assert stored.is_relative_to(api.settings.blob.local_root)


def test_ingest_pdf_waits_for_the_published_version_to_settle(api: Api) -> None:
    # A settled older version must not end the wait.
    api.store.put(record("inv-42", 3, "complete"))

    def sink(event: UploadEvent, offset: int) -> None:
        settle_later(api.store, lambda: record(event.document_id, offset, "indexing", indexed_pages=[1]), 0.05)
        settle_later(
            api.store,
            lambda: record(
                event.document_id,
                offset,
                "complete",
                filename=event.filename,
                total_pages=10,
                indexed_pages=list(range(1, 11)),
                tokens_per_page=731,
            ),
            0.2,
        )

    api.publisher.on_upload = sink
    response = api.client.post(
        "/ingest/pdf", data={"document_id": "inv-42"}, files={"file": ("inv.pdf", PDF_BYTES, "application/pdf")}
    )
    assert response.status_code == 200
    body = response.json()
    assert body == {
        "document_id": "inv-42",
        "filename": "inv.pdf",
        "total_pages": 10,
        "embedding_dimension": 128,
        "tokens_per_page": 731,
        "message": "Successfully ingested PDF with 10 pages",
        "state": "complete",
        "version": 10,
        "indexed_pages": 10,
        "failed_pages": [],
        "error": None,
    }


@pytest.mark.parametrize(
    ("state", "extra", "status", "fragment"),
    [
        ("partial", {"indexed_pages": [1, 3], "failed_pages": [2]}, 200, "failed pages [2]"),
        ("failed", {"total_pages": 0, "error": "PdfiumError: not a PDF"}, 422, "PdfiumError"),
    ],
)
def test_ingest_reports_partial_and_failed_outcomes(
    api: Api, state: str, extra: dict[str, Any], status: int, fragment: str
) -> None:
    api.publisher.on_upload = lambda event, offset: settle_later(
        api.store, lambda: record(event.document_id, offset, state, **extra), 0.02
    )
    response = api.client.post("/ingest/pdf", files={"file": ("x.pdf", PDF_BYTES)})
    assert response.status_code == status
    assert response.json()["state"] == state
    assert fragment in response.json()["message"]


def test_ingest_superseded_by_newer_version_is_409(api: Api) -> None:
    api.publisher.on_upload = lambda event, offset: settle_later(
        api.store, lambda: record(event.document_id, offset + 5, "complete"), 0.02
    )
    response = api.client.post("/ingest/pdf", data={"document_id": "d"}, files={"file": ("x.pdf", PDF_BYTES)})
    assert response.status_code == 409
    assert "superseded" in response.json()["message"]


def test_ingest_wait_timeout_is_202_with_current_state(api: Api) -> None:
    api.publisher.on_upload = lambda event, offset: api.store.put(
        record(event.document_id, offset, "indexing", indexed_pages=[1])
    )
    response = api.client.post("/ingest/pdf", params={"timeout_s": 0.1}, files={"file": ("x.pdf", PDF_BYTES)})
    assert response.status_code == 202
    body = response.json()
    assert (body["status"], body["state"], body["version"]) == ("accepted", "indexing", 10)
    assert "/documents/" in body["message"]


def test_ingest_image_accepts_png_and_labels_content_type(api: Api) -> None:
    api.publisher.on_upload = lambda event, offset: settle_later(
        api.store, lambda: record(event.document_id, offset, "complete", total_pages=1, indexed_pages=[1]), 0.02
    )
    response = api.client.post("/ingest/image", files={"file": ("scan.png", png_bytes())})
    assert response.status_code == 200
    assert response.json()["message"] == "Successfully ingested image"
    assert api.publisher.uploads[0].content_type == "image/png"


@pytest.mark.parametrize(
    ("route", "payload", "status"),
    [
        ("/ingest/pdf", png_bytes(), 415),
        ("/ingest/image", PDF_BYTES, 415),
        ("/ingest/image", b"\x89PNG\r\n\x1a\n broken", 415),
        ("/ingest/pdf", b"", 400),
        ("/ingest/pdf", b"%PDF-" + b"0" * (64 * 1024), 413),
        ("/ingest/image", png_bytes(600, 600), 413),
    ],
)
def test_ingest_rejects_wrong_type_and_oversize(api: Api, route: str, payload: bytes, status: int) -> None:
    response = api.client.post(route, params={"wait": False}, files={"file": ("f", payload)})
    assert response.status_code == status, response.text
    assert response.json()["detail"]
    assert api.publisher.uploads == []
    assert not any(p.is_file() for p in api.settings.blob.local_root.rglob("*"))


def test_ingest_rejects_invalid_document_id(api: Api) -> None:
    response = api.client.post("/ingest/pdf", data={"document_id": "../etc"}, files={"file": ("x.pdf", PDF_BYTES)})
    assert response.status_code == 422
    assert api.publisher.uploads == []


def test_publish_failure_is_503_and_leaves_no_blob(api: Api) -> None:
    api.publisher.fail = RuntimeError("no Kafka broker configured")
    response = api.client.post("/ingest/pdf", files={"file": ("x.pdf", PDF_BYTES)})
    assert response.status_code == 503
    assert "no Kafka broker configured" in response.json()["detail"]
    assert not any(p.is_file() for p in api.settings.blob.local_root.rglob("*"))


# ----------------------------------------------------------------------------- embeddings, search


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_embed_returns_real_token_multivector_and_loads_model_lazily(api: Api) -> None:
    assert api.loads == []
    response = api.client.post("/embed", json={"image": b64(png_bytes(width=64))})
    assert response.status_code == 200
    body = response.json()
    assert body["dim"] == 128
    assert body["num_tokens"] == 64 // 8  # the NaN padding rows are gone
    assert len(body["embedding"]) == body["num_tokens"]
    assert all(len(row) == 128 for row in body["embedding"])
    assert body["model"] == "tiny-colqwen2 (random weights)"
    api.client.post("/embed", json={"image": "data:image/png;base64," + b64(png_bytes())})
    assert len(api.loads) == 1
    health = api.client.get("/health").json()
    assert (health["model_loaded"], health["device"]) == (True, "cpu")


def test_embed_batch_keeps_order_and_count(api: Api) -> None:
    images = [b64(png_bytes(width=w)) for w in (16, 48, 32)]
    body = api.client.post("/embed_batch", json={"images": images}).json()
    assert body["count"] == 3
    assert [len(e) for e in body["embeddings"]] == [2, 6, 4]
    assert body["num_tokens"] == [2, 6, 4]


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"image": "not base64 !!"}, "base64"),
        ({"image": b64(b"plain text, not an image")}, "image"),
    ],
)
def test_embed_bad_input_is_400(api: Api, payload: dict[str, str], fragment: str) -> None:
    response = api.client.post("/embed", json=payload)
    assert response.status_code == 400
    assert fragment in response.json()["detail"]
    assert api.model.calls == []


def test_embed_batch_names_the_bad_image(api: Api) -> None:
    response = api.client.post("/embed_batch", json={"images": [b64(png_bytes()), "%%%"]})
    assert response.status_code == 400
    assert "images[1]" in response.json()["detail"]


def test_model_load_failure_is_503(tmp_path: Path) -> None:
    def broken(_: ModelSettings) -> FakeModel:
        raise OSError("hub unreachable")

    app = create_app(
        ColstreamSettings(state_dir=tmp_path), store=FakeStore(), publisher=FakePublisher(), model_loader=broken
    )
    with TestClient(app) as client:
        response = client.post("/embed/query", json={"text": "hello"})
    assert response.status_code == 503
    assert "hub unreachable" in response.json()["detail"]


def test_embed_query(api: Api) -> None:
    body = api.client.post("/embed/query", json={"text": "total due in march"}).json()
    assert (body["num_tokens"], body["dim"]) == (4, 128)


def test_search_embeds_query_and_returns_results(api: Api) -> None:
    payload = {"document_id": "inv-42", "page_number": 2, "version": 10, "filename": "inv.pdf", "model": "m",
               "metadata": {"tenant": "acme"}}
    api.store.search_results = [(0.91, payload), (0.5, {**payload, "page_number": 1})]
    response = api.client.post("/search", json={"query": "invoice total", "limit": 1, "document_id": "inv-42"})
    assert response.status_code == 200
    body = response.json()
    assert body["results"] == [
        {"score": 0.91, "document_id": "inv-42", "page_number": 2, "model": "m", "metadata": {"tenant": "acme"}}
    ]
    ((query, limit, document_id, filter_),) = api.store.search_calls
    assert (query.shape, limit, document_id, filter_) == ((2, 128), 1, "inv-42", None)
    assert np.isfinite(query).all()


def test_search_takes_top_k_and_a_filter_and_refuses_unknown_keys(api: Api) -> None:
    response = api.client.post("/search", json={"query": "q", "top_k": 3, "filter": {"tenant": ["a", "b"]}})
    assert response.status_code == 200, response.text
    ((_, limit, _, filter_),) = api.store.search_calls
    assert (limit, filter_) == (3, {"tenant": ["a", "b"]})
    unknown = api.client.post("/search", json={"query": "q", "filter": {"colour": "red"}})
    assert unknown.status_code == 400
    assert "'colour'" in unknown.json()["detail"]
    assert api.model.calls == ["queries"]  # refused before the model ran
    extra = api.client.post("/search", json={"query": "q", "k": 3})
    assert extra.status_code == 422
    assert extra.json()["errors"][0]["loc"] == ["body", "k"]
    disagree = api.client.post("/search", json={"query": "q", "top_k": 3, "limit": 4})
    assert disagree.status_code == 422 and "disagree" in disagree.json()["detail"]
    assert api.client.post("/search", json={"query": "q", "top_k": 101}).status_code == 422


def test_openapi_lists_every_route(api: Api) -> None:
    paths = api.client.get("/openapi.json").json()["paths"]
    for route in (
        "/health",
        "/documents",
        "/ingest/pdf",
        "/ingest/image",
        "/stats",
        "/embed",
        "/embed_batch",
        "/embed/query",
        "/search",
    ):
        assert route in paths
    assert api.client.get("/docs").status_code == 200


# ----------------------------------------------------------------------------- pure rules


def test_upload_finished_needs_settled_state_at_published_version() -> None:
    at = utcnow()
    assert not upload_finished(None, 5, at)
    assert not upload_finished(record("d", 4, "complete"), 5, at)
    assert not upload_finished(record("d", 5, "indexing"), 5, at)
    assert upload_finished(record("d", 5, "partial"), 5, at)
    assert upload_finished(record("d", 6, "deleted"), 5, at)


def test_delete_applied_by_version() -> None:
    assert delete_applied(None, 5)
    assert not delete_applied(record("d", 4, "complete"), 5)
    assert delete_applied(record("d", 5, "deleted"), 5)
    assert not delete_applied(record("d", 4, "complete"), None)


def test_clean_filename_strips_directories_and_controls() -> None:
    assert clean_filename("C:\\Users\\me\\a.pdf", "x") == "a.pdf"
    assert clean_filename("dir/../b\x00.png", "x") == "b.png"
    assert clean_filename("..", "fallback.pdf") == "fallback.pdf"
    assert clean_filename(None, "fallback.pdf") == "fallback.pdf"


def test_the_embed_image_decoder_refuses_decompression_bombs() -> None:
    decoder = EmbedImageDecoder(LimitSettings(max_embed_body_bytes=10**6, max_embed_image_pixels=50 * 50))
    with pytest.raises(RejectedInput) as caught:
        decoder.decode(b64(png_bytes(100, 100)))
    assert caught.value.status_code == 413
    image = decoder.decode(b64(png_bytes(40, 30)))
    assert (image.size, image.mode) == ((40, 30), "RGB")


def test_health_answers_within_a_second_when_kafka_hangs(tmp_path: Path) -> None:
    import threading
    import time

    hang = threading.Event()
    settings = ColstreamSettings(state_dir=tmp_path).updated(blob={"local_root": tmp_path / "blobs"},
                                                             health={"check_timeout_s": 0.5})
    app = create_app(settings, store=FakeStore(), publisher=FakePublisher(), gpu_probe=lambda: False,
                     kafka_probe=lambda: hang.wait(60))
    try:
        with TestClient(app) as client:
            for _ in range(3):
                started = time.monotonic()
                body = client.get("/health").json()
                assert time.monotonic() - started < 1.0
                assert body["kafka_connected"] is False and body["qdrant_connected"] is True
            assert "no answer for" in body["checks"]["kafka"]["detail"]
            assert body["checks"]["qdrant"]["age_s"] is not None
    finally:
        hang.set()
