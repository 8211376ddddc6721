"""The broker stops in the middle of an upload: what the client is told matches what happens.

A dedicated broker (its own state and ports, so stopping it disturbs no other
test) serves an API with the real publisher. While the broker is frozen
(SIGSTOP: the request is on the wire, no acknowledgement comes back) and while it
is down (SIGTERM: the record waits in the producer's queue), an upload answers
504 "outcome unknown"; the blob stays. Once the broker is back the queued record
lands, and every record on the uploads topic points at a blob that exists: no
phantom failed document, no BlobNotFound. The retry the answer invites is
accepted too.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
from fastapi.testclient import TestClient

from colstream.api.app import create_app
from colstream.infra.kafka import ensure_topics
from colstream.infra.local_kafka import LocalKafka
from tests.conftest import make_settings
from tests.harness import read_all
from tests.unit.api.test_app import PDF_BYTES, FakeStore

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def blob_file(uri: str) -> Path:
    return Path(url2pathname(urlparse(uri).path))


def uploads_for(settings, document_id: str) -> list[dict]:  # type: ignore[no-untyped-def]
    records = read_all(settings, settings.topics.uploads, timeout_s=5)
    return [json.loads(v) for k, v in records if k == document_id and v]


def wait_for(check, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_broker_stopped_mid_upload_answers_unknown_and_the_record_lands_with_its_blob(tmp_path: Path) -> None:
    broker = LocalKafka(state_dir=tmp_path / "broker", port=free_port(), controller_port=free_port())
    broker.start()
    try:
        settings = make_settings(tmp_path, broker.bootstrap_servers).updated(
            kafka={"publish_timeout_s": 4.0}, topics={"partitions": 1}
        )
        ensure_topics(settings)
        app = create_app(settings, store=FakeStore(), kafka_probe=lambda: True, mount_eventgrid=False)

        def upload(document_id: str) -> tuple[int, str]:
            response = client.post(
                "/ingest/pdf",
                params={"wait": False},
                data={"document_id": document_id},
                files={"file": ("a.pdf", PDF_BYTES, "application/pdf")},
            )
            return response.status_code, response.json()["detail"] if response.status_code >= 400 else ""

        with TestClient(app) as client:
            assert upload("warm-up")[0] == 202  # the producer is connected
            pid = broker.pid()
            assert pid is not None

            # 1. frozen broker: the produce request is sent, no acknowledgement comes back
            os.kill(pid, signal.SIGSTOP)
            try:
                status, detail = upload("frozen")
            finally:
                os.kill(pid, signal.SIGCONT)
            assert status == 504 and "outcome unknown" in detail and "same document_id is safe" in detail

            # 2. broker down: the record waits in the producer's queue
            broker.stop()
            status, detail = upload("down")
            assert status == 504 and "outcome unknown" in detail
            broker.start()

            for document_id in ("frozen", "down"):
                wait_for(lambda d=document_id: uploads_for(settings, d), 90, f"the queued {document_id!r} record")
                for event in uploads_for(settings, document_id):
                    assert blob_file(event["blob_uri"]).read_bytes() == PDF_BYTES, document_id
            # the retry the 504 invited is accepted and supersedes the earlier version
            assert upload("down")[0] == 202
            wait_for(lambda: len(uploads_for(settings, "down")) == 2, 30, "the retried record")
            assert all(blob_file(e["blob_uri"]).exists() for e in uploads_for(settings, "down"))
    finally:
        broker.stop()
