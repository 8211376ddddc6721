# ruff: noqa: E501  (documented sample payloads are kept verbatim)
"""The Event Grid webhook (``/eventgrid``), driven with Microsoft's documented sample payloads.

The payload shapes below are the documented samples for Blob Storage events
("Azure Blob Storage as an Event Grid source") and the subscription validation
event ("Webhook event delivery"), in both the Event Grid schema and CloudEvents
1.0. The sample account is "example" (the docs' newer samples use
"my-storage-account", which is not a legal storage account name).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from colstream.api.eventgrid import build_eventgrid_router
from colstream.infra.settings import ColstreamSettings, EventGridSettings
from colstream.producers.eventgrid import KEY_HEADER, EventGridNotSecured
from tests.fixtures.eventgrid import (
    BLOB_URL,
    CE_BLOB_CREATED,
    CE_BLOB_DELETED,
    DOC_ID,
    EG_BLOB_CREATED,
    EG_BLOB_DELETED,
    EG_VALIDATION,
    SECRET,
    FakePublisher,
    make_settings,
    with_,
)


class Harness:
    """The router with a shared secret; the client sends it in the delivery header unless told not to."""

    def __init__(self, *, send_key: bool = True, **eventgrid: Any) -> None:
        eventgrid.setdefault("shared_secret", SECRET)
        self.publisher = FakePublisher()
        self.gets: list[str] = []
        app = FastAPI()
        app.include_router(
            build_eventgrid_router(make_settings(**eventgrid), self.publisher, http_get=self.gets.append)
        )
        self.client = TestClient(app, headers={KEY_HEADER: SECRET} if send_key else {})

    def post(self, body: Any, content_type: str = "application/json", path: str = "/eventgrid") -> Any:
        return self.client.post(path, content=json.dumps(body), headers={"Content-Type": content_type})


@pytest.fixture
def h() -> Harness:
    return Harness()


# ----------------------------------------------------------------- handshakes


def test_validation_code_is_echoed_synchronously(h: Harness) -> None:
    response = h.post(EG_VALIDATION)
    assert response.status_code == 200
    assert response.json() == {"validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"}
    assert h.gets == [] and h.publisher.calls == []


def test_validation_url_only_is_fetched_in_background(h: Harness) -> None:
    event = copy.deepcopy(EG_VALIDATION)
    del event[0]["data"]["validationCode"]
    response = h.post(event)
    assert response.status_code == 200
    assert h.gets == [EG_VALIDATION[0]["data"]["validationUrl"]]


@pytest.mark.parametrize(
    "url",
    [
        "https://169.254.169.254/metadata/identity/oauth2/token",
        "http://rp-eastus2.eventgrid.azure.net:553/validate",
        "https://rp-eastus2.eventgrid.azure.net.evil.com/validate",
        "https://rp-eastus2.eventgrid.azure.net@evil.com/validate",
        "https://eventgrid.azure.net/validate",
        "file:///etc/passwd",
    ],
)
def test_validation_url_off_event_grid_is_refused(h: Harness, url: str) -> None:
    event = copy.deepcopy(EG_VALIDATION)
    event[0]["data"] = {"validationUrl": url}
    response = h.post(event)
    assert response.status_code == 200
    assert h.gets == []
    assert "refused" in response.json()["skipped"][0]["reason"]


def test_cloudevents_abuse_protection_handshake(h: Harness) -> None:
    response = h.client.options(
        "/eventgrid", headers={"WebHook-Request-Origin": "eventgrid.azure.net", "WebHook-Request-Rate": "120"}
    )
    assert response.status_code == 200
    assert response.headers["WebHook-Allowed-Origin"] == "eventgrid.azure.net"
    assert response.headers["WebHook-Allowed-Rate"] == "*"
    refused = h.client.options("/eventgrid", headers={"WebHook-Request-Origin": "evil.example.com"})
    assert refused.status_code == 403
    assert "WebHook-Allowed-Origin" not in refused.headers


def test_cloudevents_callback_handshake_is_guarded(h: Harness) -> None:
    good = "https://rp-westeurope.eventgrid.azure.net:553/validate?id=1"
    response = h.client.options(
        "/eventgrid",
        headers={"WebHook-Request-Origin": "eventgrid.azure.net", "WebHook-Request-Callback": good},
    )
    assert response.status_code == 200 and h.gets == [good]
    bad = h.client.options(
        "/eventgrid",
        headers={
            "WebHook-Request-Origin": "eventgrid.azure.net",
            "WebHook-Request-Callback": "http://10.0.0.1/",
        },
    )
    assert bad.status_code == 403 and h.gets == [good]


# ----------------------------------------------------------------- mapping


def test_blob_created_event_grid_schema_becomes_upload(h: Harness) -> None:
    response = h.post(EG_BLOB_CREATED)
    assert response.status_code == 200
    assert response.json()["uploads"] == [DOC_ID]
    [(kind, event)] = h.publisher.calls
    assert kind == "upload"
    assert event.document_id == DOC_ID
    assert event.blob_uri == BLOB_URL
    assert event.filename == "testfile.txt"
    assert event.content_type == "text/plain"
    assert event.metadata and event.metadata["sequencer"] == "00000000000004420000000000028963"


def test_blob_created_cloudevents_single_and_batch(h: Harness) -> None:
    single = h.post(CE_BLOB_CREATED, content_type="application/cloudevents+json; charset=utf-8")
    assert single.status_code == 200 and single.json()["uploads"] == [DOC_ID]
    other = with_(
        CE_BLOB_CREATED,
        id="ce-2",
        url="https://example.blob.core.windows.net/testcontainer/other.pdf",
        sequencer="00000000000004420000000000028999",
    )
    batch = h.post([other], content_type="application/cloudevents-batch+json")
    assert batch.status_code == 200 and batch.json()["uploads"] == ["testcontainer/other.pdf"]
    assert h.publisher.summary == [("upload", DOC_ID), ("upload", "testcontainer/other.pdf")]


@pytest.mark.parametrize("deleted", [EG_BLOB_DELETED, CE_BLOB_DELETED])
def test_blob_deleted_becomes_delete(h: Harness, deleted: Any) -> None:
    response = h.post(deleted)
    assert response.status_code == 200
    assert h.publisher.summary == [("delete", DOC_ID)]


def test_other_event_types_and_unlisted_blobs_are_acknowledged_not_published(h: Harness) -> None:
    tier = copy.deepcopy(EG_BLOB_CREATED)
    tier[0]["eventType"] = "Microsoft.Storage.BlobTierChanged"
    foreign = with_(
        EG_BLOB_CREATED[0], id="x1", url="https://attacker.blob.core.windows.net/testcontainer/a.pdf"
    )
    metadata_host = with_(EG_BLOB_CREATED[0], id="x2", url="http://169.254.169.254/latest/meta-data")
    adls_create = with_(EG_BLOB_CREATED[0], id="x3", api="CreateFile")
    for body in (tier, [foreign], [metadata_host], [adls_create]):
        response = h.post(body)
        assert response.status_code == 200
        assert response.json()["skipped"]
    assert h.publisher.calls == []


def test_adls_dfs_url_maps_to_blob_endpoint(h: Harness) -> None:
    flush = with_(
        EG_BLOB_CREATED[0],
        api="FlushWithClose",
        url="https://example.dfs.core.windows.net/testcontainer/testfile.txt",
    )
    assert h.post([flush]).status_code == 200
    [(_, event)] = h.publisher.calls
    assert event.blob_uri == BLOB_URL


def test_malformed_deliveries_are_rejected(h: Harness) -> None:
    assert h.client.post("/eventgrid", content=b"{not json").status_code == 400
    assert h.post([{"hello": "world"}]).status_code == 400
    assert h.post([1, 2]).status_code == 400
    assert h.publisher.calls == []


# ----------------------------------------------------------------- duplicates and ordering


def test_duplicate_deliveries_are_published_once(h: Harness) -> None:
    for _ in range(3):
        assert h.post(EG_BLOB_CREATED).status_code == 200
    # The same storage change seen through a second subscription: new event id,
    # same (eTag, sequencer).
    second_subscription = with_(EG_BLOB_CREATED[0], id="another-subscription-id")
    response = h.post([second_subscription])
    assert "duplicate" in response.json()["skipped"][0]["reason"]
    # And the CloudEvents twin of the first delivery (same id).
    h.post(CE_BLOB_CREATED, content_type="application/cloudevents+json")
    assert h.publisher.summary == [("upload", DOC_ID)]


def test_delete_arriving_before_its_create_wins(h: Harness) -> None:
    created = with_(EG_BLOB_CREATED[0], id="c1", sequencer="000000000000044200000000000289A0")
    deleted = with_(EG_BLOB_DELETED[0], id="d1", sequencer="000000000000044200000000000289B0")
    h.post([deleted])
    response = h.post([created])  # late Created, older than the Delete already applied
    assert "stale" in response.json()["skipped"][0]["reason"]
    assert h.publisher.summary == [("delete", DOC_ID)]
    recreated = with_(EG_BLOB_CREATED[0], id="c2", sequencer="000000000000044200000000000289C0")
    h.post([recreated])
    assert h.publisher.summary == [("delete", DOC_ID), ("upload", DOC_ID)]


def test_late_delete_after_newer_create_is_ignored(h: Harness) -> None:
    # The documented samples themselves: the Delete's sequencer (…0281…) is older
    # than the Create's (…0442…), so applying the Create first makes the Delete stale.
    h.post(EG_BLOB_CREATED)
    response = h.post(EG_BLOB_DELETED)
    assert "stale" in response.json()["skipped"][0]["reason"]
    assert h.publisher.summary == [("upload", DOC_ID)]


def test_ordering_within_one_batch(h: Harness) -> None:
    first = with_(EG_BLOB_CREATED[0], id="c1", sequencer="00000000000000000000000000000010")
    gone = with_(EG_BLOB_DELETED[0], id="d1", sequencer="00000000000000000000000000000020")
    h.post([gone, first])
    assert h.publisher.summary == [("delete", DOC_ID)]


def test_ordering_is_per_blob(h: Harness) -> None:
    a = with_(EG_BLOB_CREATED[0], id="a", sequencer="00000000000000000000000000000050")
    b = with_(
        EG_BLOB_CREATED[0],
        id="b",
        sequencer="00000000000000000000000000000010",
        url="https://example.blob.core.windows.net/testcontainer/b.pdf",
    )
    h.post([a, b])
    assert h.publisher.summary == [("upload", DOC_ID), ("upload", "testcontainer/b.pdf")]


def test_failed_publish_is_retried_not_deduped(h: Harness) -> None:
    h.publisher.fail_next = 1
    assert h.post(EG_BLOB_CREATED).status_code == 503
    assert h.publisher.calls == []
    assert h.post(EG_BLOB_CREATED).status_code == 200  # Event Grid's retry
    assert h.publisher.summary == [("upload", DOC_ID)]


# ----------------------------------------------------------------- document ids


def test_template_names_the_document_and_sender_fields_never_do() -> None:
    h = Harness(document_id_template="{account}:{stem}")
    h.post(EG_BLOB_CREATED)
    forged = with_(
        EG_BLOB_CREATED[0],
        id="x",
        sequencer="00000000000004420000000000028964",
        documentId="victim",
        document_id="victim",
        metadata={"document_id": "victim", "documentId": "victim"},
    )
    h.post([forged])
    assert h.publisher.summary == [("upload", "example:testfile"), ("upload", "example:testfile")]


def test_forged_blob_deleted_cannot_name_another_document() -> None:
    h = Harness()
    forged = with_(EG_BLOB_DELETED[0], id="forged", documentId="victim", metadata={"document_id": "victim"})
    assert h.post([forged]).status_code == 200
    assert h.publisher.summary == [("delete", DOC_ID)]


def test_bad_template_fails_at_startup() -> None:
    with pytest.raises(ValueError, match="DOCUMENT_ID_TEMPLATE"):
        Harness(document_id_template="{container}/{path}")


def test_unfit_document_id_is_skipped_not_published() -> None:
    h = Harness(document_id_template="{blob}")
    odd = with_(EG_BLOB_CREATED[0], url="https://example.blob.core.windows.net/testcontainer/_hidden.pdf")
    response = h.post([odd])
    assert response.status_code == 200 and "DOCUMENT_ID_PATTERN" in response.json()["skipped"][0]["reason"]
    assert h.publisher.calls == []


def test_shared_secret_is_required_on_every_request() -> None:
    h = Harness(send_key=False)
    assert h.post(EG_VALIDATION).status_code == 401
    assert h.post(EG_BLOB_DELETED).status_code == 401
    assert h.post(EG_VALIDATION, path="/eventgrid?key=wrong").status_code == 401
    assert h.post(EG_VALIDATION, path=f"/eventgrid?key={SECRET[:-1]}").status_code == 401
    assert h.post(EG_VALIDATION, path="/eventgrid?key=").status_code == 401
    assert h.client.options("/eventgrid", headers={"WebHook-Request-Origin": "eventgrid.azure.net"}).status_code == 401
    assert h.publisher.calls == []
    assert h.post(EG_VALIDATION, path=f"/eventgrid?key={SECRET}").json()["validationResponse"]
    wrong_header = h.client.post("/eventgrid", content=json.dumps(EG_VALIDATION), headers={KEY_HEADER: "x" * 32})
    assert wrong_header.status_code == 401
    assert h.client.post("/eventgrid", content=json.dumps(EG_VALIDATION), headers={KEY_HEADER: SECRET}).status_code == 200


def test_router_refuses_to_build_without_a_secret_unless_explicitly_open() -> None:
    with pytest.raises(EventGridNotSecured, match="SHARED_SECRET"):
        build_eventgrid_router(make_settings(), FakePublisher())
    with pytest.raises(ValueError, match="at least 16"):
        EventGridSettings(shared_secret="short")
    open_h = Harness(send_key=False, shared_secret=None, allow_unauthenticated=True)
    assert open_h.post(EG_VALIDATION).status_code == 200


def test_api_does_not_mount_an_unauthenticated_webhook(tmp_path: Any) -> None:
    from colstream.api.app import create_app

    base = ColstreamSettings(state_dir=tmp_path).updated(
        blob={"local_root": tmp_path / "blobs", "azure_accounts": ["example"], "azure_containers": ["testcontainer"]}
    )
    publisher = FakePublisher()
    with TestClient(create_app(base, publisher=publisher, kafka_probe=lambda: True)) as client:
        assert client.post("/eventgrid", json=EG_BLOB_DELETED).status_code in (404, 405)
        assert "/eventgrid" not in client.get("/openapi.json").json()["paths"]
    secured = base.updated(eventgrid={"shared_secret": SECRET})
    with TestClient(create_app(secured, publisher=publisher, kafka_probe=lambda: True)) as client:
        assert client.post("/eventgrid", json=EG_BLOB_DELETED).status_code == 401
        assert client.post(f"/eventgrid?key={SECRET}", json=EG_BLOB_DELETED).status_code == 200
    assert publisher.summary == [("delete", DOC_ID)]


