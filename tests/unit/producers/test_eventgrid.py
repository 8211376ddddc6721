# ruff: noqa: E501  (documented sample payloads are kept verbatim)
"""Event Grid blob-drop trigger, driven with Microsoft's documented sample payloads.

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

from colstream.infra.settings import BlobSettings, ColstreamSettings, EventGridSettings
from colstream.producers.eventgrid import (
    KEY_HEADER,
    EventGridNotSecured,
    EventGridProcessor,
    build_eventgrid_router,
    derive_document_id,
    is_valid_document_id,
    parse_delivery,
)
from colstream.schemas.events import UploadEvent

EG_BLOB_CREATED = json.loads(r"""
[{
  "topic": "/subscriptions/{subscription-id}/resourceGroups/Storage/providers/Microsoft.Storage/storageAccounts/example",
  "subject": "/blobServices/default/containers/testcontainer/blobs/testfile.txt",
  "eventType": "Microsoft.Storage.BlobCreated",
  "eventTime": "2017-06-26T18:41:00.9584103Z",
  "id": "831e1650-001e-001b-66ab-eeb76e069631",
  "data": {
    "api": "PutBlockList",
    "clientRequestId": "6d79dbfb-0e37-4fc4-981f-442c9ca65760",
    "requestId": "831e1650-001e-001b-66ab-eeb76e000000",
    "eTag": "\"0x8D4BCC2E4835CD0\"",
    "contentType": "text/plain",
    "contentLength": 524288,
    "blobType": "BlockBlob",
    "accessTier": "Default",
    "url": "https://example.blob.core.windows.net/testcontainer/testfile.txt",
    "sequencer": "00000000000004420000000000028963",
    "storageDiagnostics": {
      "batchId": "b68529f3-68cd-4744-baa4-3c0498ec19f0"
    }
  },
  "dataVersion": "",
  "metadataVersion": "1"
}]
""")

EG_BLOB_DELETED = json.loads(r"""
[{
  "topic": "/subscriptions/{subscription-id}/resourceGroups/Storage/providers/Microsoft.Storage/storageAccounts/example",
  "subject": "/blobServices/default/containers/testcontainer/blobs/testfile.txt",
  "eventType": "Microsoft.Storage.BlobDeleted",
  "eventTime": "2017-11-07T20:09:22.5674003Z",
  "id": "4c2359fe-001e-00ba-0e04-58586806d298",
  "data": {
    "api": "DeleteBlob",
    "requestId": "4c2359fe-001e-00ba-0e04-585868000000",
    "contentType": "text/plain",
    "blobType": "BlockBlob",
    "url": "https://example.blob.core.windows.net/testcontainer/testfile.txt",
    "sequencer": "0000000000000281000000000002F5CA",
    "storageDiagnostics": {
      "batchId": "b68529f3-68cd-4744-baa4-3c0498ec19f0"
    }
  },
  "dataVersion": "",
  "metadataVersion": "1"
}]
""")

CE_BLOB_CREATED = json.loads(r"""
{
  "source": "/subscriptions/{subscription-id}/resourceGroups/Storage/providers/Microsoft.Storage/storageAccounts/example",
  "subject": "/blobServices/default/containers/testcontainer/blobs/testfile.txt",
  "type": "Microsoft.Storage.BlobCreated",
  "time": "2017-06-26T18:41:00.9584103Z",
  "id": "831e1650-001e-001b-66ab-eeb76e069631",
  "data": {
    "api": "PutBlockList",
    "clientRequestId": "6d79dbfb-0e37-4fc4-981f-442c9ca65760",
    "requestId": "831e1650-001e-001b-66ab-eeb76e000000",
    "eTag": "\"0x8D4BCC2E4835CD0\"",
    "contentType": "text/plain",
    "contentLength": 524288,
    "blobType": "BlockBlob",
    "accessTier": "Default",
    "url": "https://example.blob.core.windows.net/testcontainer/testfile.txt",
    "sequencer": "00000000000004420000000000028963",
    "storageDiagnostics": {
      "batchId": "b68529f3-68cd-4744-baa4-3c0498ec19f0"
    }
  },
  "specversion": "1.0"
}
""")

CE_BLOB_DELETED = json.loads(r"""
{
  "source": "/subscriptions/{subscription-id}/resourceGroups/Storage/providers/Microsoft.Storage/storageAccounts/example",
  "subject": "/blobServices/default/containers/testcontainer/blobs/testfile.txt",
  "type": "Microsoft.Storage.BlobDeleted",
  "time": "2017-11-07T20:09:22.5674003Z",
  "id": "4c2359fe-001e-00ba-0e04-58586806d298",
  "data": {
    "api": "DeleteBlob",
    "requestId": "4c2359fe-001e-00ba-0e04-585868000000",
    "contentType": "text/plain",
    "blobType": "BlockBlob",
    "url": "https://example.blob.core.windows.net/testcontainer/testfile.txt",
    "sequencer": "0000000000000281000000000002F5CA",
    "storageDiagnostics": {
      "batchId": "b68529f3-68cd-4744-baa4-3c0498ec19f0"
    }
  },
  "specversion": "1.0"
}
""")

EG_VALIDATION = json.loads(r"""
[{
  "id": "2d1781af-3a4c-4d7c-bd0c-e34b19da4e66",
  "topic": "/subscriptions/xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx",
  "subject": "",
  "data": {
    "validationCode": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6",
    "validationUrl": "https://rp-eastus2.eventgrid.azure.net:553/eventsubscriptions/myeventsub/validate?id=0000000000-0000-0000-0000-00000000000000&t=2022-10-28T04:23:35.1981776Z&apiVersion=2018-05-01-preview&token=1A1A1A1A"
  },
  "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
  "eventTime": "2022-10-28T04:23:35.1981776Z",
  "metadataVersion": "1",
  "dataVersion": "1"
}]
""")

DOC_ID = "testcontainer/testfile.txt"
BLOB_URL = "https://example.blob.core.windows.net/testcontainer/testfile.txt"


class FakePublisher:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail_next = 0

    def publish_upload(self, event: UploadEvent) -> None:
        self._maybe_fail()
        self.calls.append(("upload", event))

    def publish_delete(self, document_id: str) -> None:
        self._maybe_fail()
        self.calls.append(("delete", document_id))

    def _maybe_fail(self) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("broker unavailable")

    @property
    def summary(self) -> list[tuple[str, str]]:
        return [(kind, arg.document_id if kind == "upload" else arg) for kind, arg in self.calls]


def make_settings(**eventgrid: Any) -> ColstreamSettings:
    return ColstreamSettings(
        blob=BlobSettings(azure_accounts=["example"], azure_containers=["testcontainer"]),
        eventgrid=EventGridSettings(**eventgrid),
    )


SECRET = "0123456789abcdef0123456789abcdef"


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


def with_(event: dict[str, Any], *, id: str | None = None, **data: Any) -> dict[str, Any]:
    clone = copy.deepcopy(event)
    if id is not None:
        clone["id"] = id
    clone["data"].update(data)
    return clone


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


def test_dedupe_memory_is_bounded() -> None:
    publisher = FakePublisher()
    settings = make_settings(dedupe_capacity=2)
    processor = EventGridProcessor(settings.eventgrid, settings.blob, publisher)
    for n in range(3):
        processor.handle(
            [
                with_(
                    EG_BLOB_CREATED[0],
                    id=f"e{n}",
                    sequencer=None,
                    url=f"https://example.blob.core.windows.net/testcontainer/{n}.pdf",
                )
            ]
        )
    processor.handle(
        [
            with_(
                EG_BLOB_CREATED[0],
                id="e0",
                sequencer=None,
                url="https://example.blob.core.windows.net/testcontainer/0.pdf",
            )
        ]
    )
    # e0 fell out of the 2-entry LRU, so it is applied again (harmless downstream).
    assert len(publisher.calls) == 4
    assert len(processor._seen_ids) == 2


# ----------------------------------------------------------------- document ids


def test_document_id_escaping_is_valid_and_injective() -> None:
    spaced = derive_document_id(
        "{container}/{blob}", account="a", container="docs", blob="reports/Q1 2026.pdf"
    )
    assert spaced == "docs/reports/Q1=202026.pdf"
    literal = derive_document_id(
        "{container}/{blob}", account="a", container="docs", blob="reports/Q1=202026.pdf"
    )
    assert literal != spaced and is_valid_document_id(literal)
    for blob in ("ünïcode/файл.pdf", "a..b.pdf", "a....pdf", "x#y?z%.pdf", "tab\there"):
        assert is_valid_document_id(
            derive_document_id("{container}/{blob}", account="a", container="c1", blob=blob)
        )


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


def test_parse_delivery_accepts_mixed_schema_batch() -> None:
    events = parse_delivery([EG_BLOB_CREATED[0], CE_BLOB_DELETED])
    assert [(e.schema, e.type) for e in events] == [
        ("eventgrid", "Microsoft.Storage.BlobCreated"),
        ("cloudevents", "Microsoft.Storage.BlobDeleted"),
    ]
