"""What a new user does: `colstream run all`, kcat and console tools in, CLI and HTTP out."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from colstream.infra.settings import ColstreamSettings
from tests.fixtures.docs import make_encrypted_pdf, make_image, make_pdf
from tests.harness import REPO, kcat_produce, read_all, settings_env, upload_line, wait_for

pytestmark = pytest.mark.kafka


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def run_all(settings: ColstreamSettings, log: Path, extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """``colstream run all`` on ``settings`` (give it :func:`on_free_port` settings, so that the
    CLI calls made with the same settings reach its API)."""
    env = {**settings_env(settings), "COLSTREAM_API__HOST": "127.0.0.1", **(extra_env or {})}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "colstream", "run", "all"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO)
        try:
            wait_for(lambda: _healthy(settings.api.public_url) or proc.poll() is not None, 180, what="run all /health")
            assert proc.poll() is None, log.read_text()[-3000:]
            yield settings.api.public_url
        finally:
            proc.terminate()
            proc.wait(60)


def on_free_port(settings: ColstreamSettings) -> ColstreamSettings:
    port = free_port()
    return settings.updated(api={"port": port, "public_url": f"http://127.0.0.1:{port}"})


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def colstream(settings: ColstreamSettings, *args: str, stdin: str | None = None, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "colstream", *args], env={**settings_env(settings), **env},
                          input=stdin, capture_output=True, text=True, timeout=180, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def documents(settings: ColstreamSettings) -> dict[str, dict]:
    rows = json.loads(colstream(settings, "documents", "--json"))
    return {r["document_id"]: r for r in rows}


def test_run_all_indexes_pdfs_published_with_kcat_and_the_cli_lists_them(
    pipeline_settings: ColstreamSettings, tmp_path: Path
) -> None:
    settings = pipeline_settings
    pdfs = {"one-page": 1, "five-pages": 5, "twelve-pages": 12}
    lines = []
    for name, pages in pdfs.items():
        path = settings.blob.local_root / f"{name}.pdf"
        path.write_bytes(make_pdf(pages))
        lines.append(upload_line(name, path.resolve().as_uri(), filename=f"{name}.pdf"))
    locked = settings.blob.local_root / "locked.pdf"
    locked.write_bytes(make_encrypted_pdf(1, user_password="pw"))
    lines.append(upload_line("locked", locked.resolve().as_uri()))

    settings = on_free_port(settings)

    with run_all(settings, tmp_path / "run-all.log") as url:
        kcat_produce(settings, settings.topics.uploads, lines)
        wait_for(lambda: all(documents(settings).get(n, {}).get("state") == "complete" for n in pdfs), 180,
                 what="all PDFs complete")
        listed = documents(settings)
        for name, pages in pdfs.items():
            assert listed[name]["total_pages"] == pages
            assert listed[name]["indexed_pages"] == pages
            assert listed[name]["embedding_dimension"] == 128
            assert listed[name]["filename"] == f"{name}.pdf"
        # the HTTP read model answers in the seed's shape
        api_rows = {r["document_id"]: r for r in httpx.get(f"{url}/documents", timeout=10).json()}
        assert {k: api_rows["five-pages"][k] for k in ("document_id", "filename", "total_pages",
                                                       "embedding_dimension")} == {
            "document_id": "five-pages", "filename": "five-pages.pdf", "total_pages": 5, "embedding_dimension": 128}
        stats = httpx.get(f"{url}/stats", timeout=10).json()
        assert stats["collection_name"] == "colpali_embeddings" and stats["total_vectors"] == 18

        # the encrypted PDF is a dead letter with a reason, readable with `colstream dlq list`
        wait_for(lambda: "EncryptedDocument" in colstream(settings, "dlq", "list"), 60, what="dead letter")
        assert "password" in colstream(settings, "dlq", "list", "--document-id", "locked").lower()

        # a kcat tombstone removes its document
        kcat_produce(settings, settings.topics.uploads, ["five-pages|"])
        wait_for(lambda: "five-pages" not in documents(settings), 60, what="five-pages deleted")
        assert httpx.get(f"{url}/stats", timeout=10).json()["total_vectors"] == 13


def test_kafka_console_producer_publishes_uploads_and_tombstones(
    pipeline_settings: ColstreamSettings, tmp_path: Path
) -> None:
    settings = pipeline_settings
    path = settings.blob.local_root / "console.pdf"
    path.write_bytes(make_pdf(2))
    event = json.dumps({"document_id": "console", "blob_uri": path.resolve().as_uri()})
    producer = ["kafka", "tool", "kafka-console-producer", "--bootstrap-server",
                settings.kafka.bootstrap_servers or "", "--topic", settings.topics.uploads,
                "--property", "parse.key=true", "--property", "key.separator=|"]
    settings = on_free_port(settings)
    with run_all(settings, tmp_path / "run-all.log"):
        colstream(settings, *producer, stdin=f"console|{event}\n")
        wait_for(lambda: documents(settings).get("console", {}).get("indexed_pages") == 2, 120,
                 what="console upload indexed")
        colstream(settings, *producer, "--property", "null.marker=NULL", stdin="console|NULL\n")
        wait_for(lambda: "console" not in documents(settings), 60, what="console tombstone applied")


def test_dead_letters_are_redriven_once_the_cause_is_fixed(pipeline_settings: ColstreamSettings,
                                                           tmp_path: Path) -> None:
    settings = pipeline_settings
    late = settings.blob.local_root / "late.pdf"
    settings = on_free_port(settings)
    with run_all(settings, tmp_path / "run-all.log"):
        kcat_produce(settings, settings.topics.uploads, [upload_line("late", late.resolve().as_uri())])
        wait_for(lambda: "BlobNotFound" in colstream(settings, "dlq", "list"), 60, what="BlobNotFound")
        late.write_bytes(make_pdf(3))  # the cause, fixed
        out = colstream(settings, "dlq", "redrive", "--document-id", "late")
        assert "1 records redriven" in out
        wait_for(lambda: documents(settings).get("late", {}).get("indexed_pages") == 3, 120, what="redriven doc")


def test_claim_check_carries_pages_bigger_than_the_topic_limit(
    kafka_bootstrap: str, tiny_colqwen2: Path, tmp_path: Path
) -> None:
    from colstream.infra.kafka import ensure_topics
    from tests.conftest import make_settings
    from tests.harness import pipeline_in_threads

    settings = make_settings(tmp_path, kafka_bootstrap, tiny_colqwen2, pages_max_message_bytes=32_768)
    ensure_topics(settings)
    import numpy as np
    from PIL import Image

    noise = Image.fromarray(np.random.default_rng(1).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    (settings.blob.local_root / "noise.png").write_bytes(_png(noise))
    (settings.blob.local_root / "plain.png").write_bytes(make_image("PNG", (640, 480)))
    with pipeline_in_threads(settings) as store:
        kcat_produce(settings, settings.topics.uploads, [
            upload_line("noise", (settings.blob.local_root / "noise.png").resolve().as_uri()),
            upload_line("plain", (settings.blob.local_root / "plain.png").resolve().as_uri()),
        ])
        wait_for(lambda: store.count_pages("noise") == 1 and store.count_pages("plain") == 1, 120)
    pages = {k: json.loads(v) for k, v in read_all(settings, settings.topics.pages) if v}
    assert "image_ref" in pages["noise"] and "image_b64" not in pages["noise"]
    assert "image_b64" in pages["plain"] and "image_ref" not in pages["plain"]
    assert max(len(v or b"") for _, v in read_all(settings, settings.topics.pages)) < 32_768


def _png(image: object) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # type: ignore[attr-defined]
    return buffer.getvalue()


def test_topics_create_is_idempotent_and_configures_the_topics(kafka_bootstrap: str, tmp_path: Path) -> None:
    from colstream.infra.kafka import describe_topic_configs
    from tests.conftest import make_settings

    settings = make_settings(tmp_path, kafka_bootstrap)
    first = colstream(settings, "topics", "create")
    second = colstream(settings, "topics", "create")
    assert first.count(": created") == 5 and second.count(": exists") == 5
    configs = describe_topic_configs(settings, [settings.topics.uploads, settings.topics.pages])
    assert configs[settings.topics.uploads]["cleanup.policy"] == "compact"
    assert configs[settings.topics.pages]["max.message.bytes"] == str(settings.topics.pages_max_message_bytes)


# -- Azure: a blob dropped into an Azurite container, announced by Event Grid ------------------
def _eventgrid_event(event_type: str, url: str, container: str, blob: str, sequencer: str) -> dict:
    """Shaped like Microsoft's documented Microsoft.Storage.BlobCreated/BlobDeleted samples."""
    data = {
        "api": "PutBlob" if event_type.endswith("Created") else "DeleteBlob",
        "clientRequestId": str(uuid.uuid4()),
        "requestId": str(uuid.uuid4()),
        "eTag": "0x8D4BCC2E4835CD0",
        "contentType": "application/pdf",
        "contentLength": 524288,
        "blobType": "BlockBlob",
        "url": url,
        "sequencer": sequencer,
        "storageDiagnostics": {"batchId": str(uuid.uuid4())},
    }
    return {
        "topic": "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/Storage/providers/"
                 "Microsoft.Storage/storageAccounts/devstoreaccount1",
        "subject": f"/blobServices/default/containers/{container}/blobs/{blob}",
        "eventType": event_type,
        "eventTime": time.strftime("%Y-%m-%dT%H:%M:%S.0000000Z", time.gmtime()),
        "id": str(uuid.uuid4()),
        "data": data,
        "dataVersion": "",
        "metadataVersion": "1",
    }


def azurite_env(azurite) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Settings, as a user would export them, that point colstream at the emulator."""
    return {
        "COLSTREAM_BLOB__AZURE_AUTH": "connection_string",
        "COLSTREAM_BLOB__AZURE_CONNECTION_STRING": azurite.connection_string,
        "COLSTREAM_BLOB__AZURE_ENDPOINTS": json.dumps({azurite.account_name: azurite.blob_endpoint}),
        "COLSTREAM_BLOB__AZURE_ACCOUNTS": json.dumps([azurite.account_name]),
    }


@pytest.mark.azurite
def test_blob_dropped_in_azurite_and_announced_by_event_grid_is_indexed_then_removed(
    pipeline_settings: ColstreamSettings, azurite, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    from azure.storage.blob import BlobServiceClient

    settings = pipeline_settings
    container = f"drop-{uuid.uuid4().hex[:8]}"
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    service.create_container(container)
    service.get_blob_client(container, "reports/q3.pdf").upload_blob(make_pdf(4))
    url = f"{azurite.blob_endpoint}/{container}/reports/q3.pdf"
    env = azurite_env(azurite)
    # The webhook is mounted only with a secret; the subscription's endpoint carries it as ?key=.
    secret = uuid.uuid4().hex
    env["COLSTREAM_EVENTGRID__SHARED_SECRET"] = secret
    settings = on_free_port(settings)
    with run_all(settings, tmp_path / "run-all.log", env) as base:
        api = f"{base}/eventgrid?key={secret}"
        # the subscription handshake first, as Event Grid does when the webhook is registered
        handshake = httpx.post(api, timeout=10, json=[{
            "id": str(uuid.uuid4()), "topic": "/subscriptions/x", "subject": "",
            "data": {"validationCode": "512d38b6-c7b8-40c8-89fe-f46f9e9dfb7f"},
            "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
            "eventTime": "2026-11-26T00:00:00Z", "metadataVersion": "1", "dataVersion": "1"}])
        assert handshake.json() == {"validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9dfb7f"}

        created = _eventgrid_event("Microsoft.Storage.BlobCreated", url, container, "reports/q3.pdf",
                                   "0000000000000000000000000000100000000000000000a1")
        assert httpx.post(api, json=[created], timeout=10).status_code == 200
        # Event Grid delivers at least once: the same delivery again is harmless
        assert httpx.post(api, json=[created], timeout=10).status_code == 200
        doc_id = f"{container}/reports/q3.pdf"
        wait_for(lambda: documents(settings).get(doc_id, {}).get("indexed_pages") == 4, 180, what="blob indexed")
        uploads = [k for k, v in read_all(settings, settings.topics.uploads) if k == doc_id and v]
        assert len(uploads) == 1

        service.get_blob_client(container, "reports/q3.pdf").delete_blob()
        deleted = _eventgrid_event("Microsoft.Storage.BlobDeleted", url, container, "reports/q3.pdf",
                                   "0000000000000000000000000000100000000000000000b2")
        assert httpx.post(api, json=[deleted], timeout=10).status_code == 200
        # a late, re-delivered BlobCreated for the older change must not resurrect it
        assert httpx.post(api, json=[{**created, "id": str(uuid.uuid4())}],
                          timeout=10).status_code == 200
        wait_for(lambda: doc_id not in documents(settings), 60, what="blob removed")
        time.sleep(2)
        assert doc_id not in documents(settings)


@pytest.mark.azurite
def test_publish_upload_of_a_local_file_to_an_azure_container(
    pipeline_settings: ColstreamSettings, azurite, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    settings = pipeline_settings
    pdf = tmp_path / "local.pdf"
    pdf.write_bytes(make_pdf(2))
    container = f"up-{uuid.uuid4().hex[:8]}"
    env = {
        **azurite_env(azurite),
        "COLSTREAM_BLOB__AZURE_UPLOAD_CONTAINER": container,
        "COLSTREAM_BLOB__AZURE_UPLOAD_ACCOUNT": azurite.account_name,
    }
    settings = on_free_port(settings)
    with run_all(settings, tmp_path / "run-all.log", env):
        out = colstream(settings, "publish", "upload", "--document-id", "from-laptop", str(pdf), **env)
        assert f"{azurite.blob_endpoint}/{container}/" in out
        wait_for(lambda: documents(settings).get("from-laptop", {}).get("indexed_pages") == 2, 120)
        assert "<tombstone>" in colstream(settings, "publish", "delete", "from-laptop", **env)
        wait_for(lambda: "from-laptop" not in documents(settings), 60, what="CLI delete applied")


def test_the_original_rest_surface_works_over_the_pipeline(pipeline_settings: ColstreamSettings,
                                                           tmp_path: Path) -> None:
    """The seeds' endpoints, now producers and read models around Kafka."""
    import base64

    settings = on_free_port(pipeline_settings)
    with run_all(settings, tmp_path / "run-all.log") as api:
        health = httpx.get(f"{api}/health", timeout=10).json()
        assert health["status"] == "healthy" and health["kafka_connected"] and health["qdrant_connected"]

        pdf = httpx.post(f"{api}/ingest/pdf", files={"file": ("memo.pdf", make_pdf(3), "application/pdf")},
                         data={"document_id": "memo"}, timeout=180)
        assert pdf.status_code == 200, pdf.text
        body = pdf.json()
        assert (body["document_id"], body["filename"], body["total_pages"], body["embedding_dimension"]) == (
            "memo", "memo.pdf", 3, 128)
        image = httpx.post(f"{api}/ingest/image", files={"file": ("shot.png", make_image("PNG", (500, 400)),
                                                                  "image/png")}, timeout=180)
        assert image.status_code == 200 and image.json()["total_pages"] == 1
        not_pdf = httpx.post(f"{api}/ingest/pdf", files={"file": ("x.pdf", b"hello", "application/pdf")},
                             timeout=30)
        assert not_pdf.status_code == 415

        listed = {d["document_id"] for d in httpx.get(f"{api}/documents", timeout=10).json()}
        assert {"memo", image.json()["document_id"]} <= listed
        assert httpx.get(f"{api}/stats", timeout=10).json()["total_vectors"] == 4

        embedded = httpx.post(f"{api}/embed", json={"image": base64.b64encode(make_image("PNG", (300, 200))).decode()},
                              timeout=120).json()
        assert embedded["dim"] == 128 and len(embedded["embedding"]) == embedded["num_tokens"] > 0
        assert "random weights" in embedded["model"]
        batch = httpx.post(f"{api}/embed_batch", json={"images": [base64.b64encode(make_image("PNG")).decode()] * 2},
                           timeout=120).json()
        assert batch["count"] == 2
        found = httpx.post(f"{api}/search", json={"query": "memo", "limit": 2}, timeout=120).json()
        assert len(found["results"]) == 2 and {r["document_id"] for r in found["results"]} <= listed
        assert all(r["model"] and r["page_number"] >= 1 and r["metadata"] == {} for r in found["results"])
        assert health["gpu_available"] in (True, False) and pdf.json()["tokens_per_page"] > 0

        gone = httpx.delete(f"{api}/document/memo", params={"wait": "true"}, timeout=90)
        assert gone.status_code == 200 and "deleted" in gone.json()["message"]
        assert httpx.get(f"{api}/stats", timeout=10).json()["total_vectors"] == 1
