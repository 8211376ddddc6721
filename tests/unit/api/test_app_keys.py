"""The REST API with API keys: the 401/403 matrix by scope, two tenants kept apart,
the upload metadata field, body limits and the error contract (fakes for Kafka,
the store and the model; the local blob store under tmp_path)."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from colstream.api.app import create_app
from colstream.api.auth import KeyConfigError
from colstream.infra.settings import ColstreamSettings
from tests.unit.api.test_app import PDF_BYTES, FakeModel, FakePublisher, FakeStore, png_bytes, record

KEYS = {
    "reader": ("reader-key-000000000000", ["read"], None),
    "writer": ("writer-key-000000000000", ["write"], None),
    "deleter": ("deleter-key-00000000000", ["delete"], None),
    "admin": ("admin-key-0000000000000", ["admin"], None),
    "acme": ("acme-key-00000000000000", ["read", "write", "delete"], "acme"),
    "globex": ("globex-key-000000000000", ["read", "write", "delete"], "globex"),
}


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name][0]}"}


def key_specs() -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = []
    for name, (key, scopes, tenant) in KEYS.items():
        # One key given as its digest, as a Secret would hold it.
        secret = {"key_sha256": hashlib.sha256(key.encode()).hexdigest()} if name == "admin" else {"key": key}
        specs.append({**secret, "scopes": scopes, "tenant": tenant, "name": name})
    return specs


class Env:
    def __init__(self, client: TestClient, store: FakeStore, publisher: FakePublisher, model: FakeModel) -> None:
        self.client, self.store, self.publisher, self.model = client, store, publisher, model


def make_settings(tmp_path: Path, **api: Any) -> ColstreamSettings:
    return ColstreamSettings(state_dir=tmp_path).updated(
        blob={"local_root": tmp_path / "blobs"},
        limits={"max_blob_bytes": 64 * 1024, "max_image_pixels": 500 * 500},
        api={"keys": key_specs(), "max_upload_bytes": 96 * 1024, **api},
    )


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    store, publisher, model = FakeStore(), FakePublisher(first_offset=10), FakeModel()
    app = create_app(make_settings(tmp_path), store=store, publisher=publisher, model_loader=lambda _: model,
                     poll_interval_s=0.02, gpu_probe=lambda: False, mount_eventgrid=False)
    with TestClient(app) as client:
        yield Env(client, store, publisher, model)


def b64png() -> str:
    return base64.b64encode(png_bytes()).decode()


# (method, path, json body, files, the scope it needs)
ROUTES: list[tuple[str, str, Any, Any, str]] = [
    ("GET", "/documents", None, None, "read"),
    ("GET", "/documents/doc-1", None, None, "read"),
    ("GET", "/stats", None, None, "read"),
    ("POST", "/search", {"query": "total"}, None, "read"),
    ("POST", "/embed", {"image": "IMAGE"}, None, "read"),
    ("POST", "/embed_batch", {"images": ["IMAGE"]}, None, "read"),
    ("POST", "/embed/query", {"text": "total"}, None, "read"),
    ("POST", "/ingest/pdf?wait=false", None, {"file": ("a.pdf", PDF_BYTES)}, "write"),
    ("POST", "/ingest/image?wait=false", None, {"file": ("a.png", png_bytes())}, "write"),
    ("DELETE", "/document/doc-1", None, None, "delete"),
]


def call(env: Env, method: str, path: str, body: Any, files: Any, headers: dict[str, str]) -> Any:
    if isinstance(body, dict):
        body = json.loads(json.dumps(body).replace("IMAGE", b64png()))
    return env.client.request(method, path, json=body, files=files, headers=headers)


@pytest.mark.parametrize(("method", "path", "body", "files", "scope"), ROUTES, ids=[f"{r[0]} {r[1]}" for r in ROUTES])
def test_the_401_403_matrix_route_by_scope(
    env: Env, method: str, path: str, body: Any, files: Any, scope: str
) -> None:
    env.store.put(record("doc-1", 3, "complete"))
    missing = call(env, method, path, body, files, {})
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith('Bearer realm="colstream"')
    assert "API key" in missing.json()["detail"]
    unknown = call(env, method, path, body, files, {"X-API-Key": "not-a-configured-key-000"})
    assert unknown.status_code == 401 and "invalid_token" in unknown.headers["WWW-Authenticate"]
    for name in ("reader", "writer", "deleter", "admin"):
        response = call(env, method, path, body, files, auth(name))
        if name == "admin" or name.startswith(scope[:4]):
            assert response.status_code < 400, (name, response.text)
        else:
            assert response.status_code == 403, (name, response.text)
            assert f"'{scope}' scope" in response.json()["detail"]
    # The same key in the other header.
    assert call(env, method, path, body, files, {"X-API-Key": KEYS["admin"][0]}).status_code < 400


def test_health_stays_open(env: Env) -> None:
    body = env.client.get("/health").json()
    assert body["status"] == "healthy" and body["gpu_available"] is False


def test_two_tenants_are_kept_apart_on_list_get_stats_search_and_delete(env: Env) -> None:
    env.store.put(record("acme-1", 1, "complete", metadata={"tenant": "acme"}))
    env.store.put(record("globex-1", 2, "complete", metadata={"tenant": "globex"}))
    client = env.client
    listed = {d["document_id"] for d in client.get("/documents", headers=auth("acme")).json()}
    assert listed == {"acme-1"}
    assert {d["document_id"] for d in client.get("/documents", headers=auth("admin")).json()} == {"acme-1", "globex-1"}
    assert client.get("/documents/acme-1", headers=auth("acme")).json()["metadata"] == {"tenant": "acme"}
    other = client.get("/documents/globex-1", headers=auth("acme"))
    missing = client.get("/documents/never-was", headers=auth("acme"))
    assert other.status_code == missing.status_code == 404
    assert other.json()["detail"] == missing.json()["detail"].replace("never-was", "globex-1")
    refused = client.delete("/document/globex-1", headers=auth("acme"))
    assert refused.status_code == 404 and env.publisher.deletes == []
    assert client.delete("/document/globex-1", headers=auth("globex")).status_code == 202
    assert env.publisher.deletes == ["globex-1"]

    env.store.pages = 40
    assert client.get("/stats", headers=auth("acme")).json()["total_vectors"] == 40
    assert env.store.count_calls[-1] == {"tenant": "acme"}
    calls = len(env.store.count_calls)
    assert client.get("/stats", headers=auth("admin")).json()["total_vectors"] == 40
    assert len(env.store.count_calls) == calls  # admin reads the whole collection's stats

    for asked, forced in [(None, "acme"), ({"tenant": "globex"}, []), ({"tenant": ["globex", "acme"]}, ["acme"])]:
        body: dict[str, Any] = {"query": "total"} if asked is None else {"query": "total", "filter": asked}
        assert client.post("/search", json=body, headers=auth("acme")).status_code == 200
        assert env.store.search_calls[-1][3] == {"tenant": forced}
    client.post("/search", json={"query": "total", "filter": {"tenant": "globex"}}, headers=auth("admin"))
    assert env.store.search_calls[-1][3] == {"tenant": "globex"}


def test_uploads_carry_the_metadata_field_and_the_keys_tenant(env: Env) -> None:
    client = env.client

    def upload(headers: dict[str, str], **data: str) -> Any:
        return client.post("/ingest/pdf", params={"wait": False}, data=data, files={"file": ("a.pdf", PDF_BYTES)},
                           headers=headers)

    assert upload(auth("acme"), metadata='{"year": 2026, "tags": ["x"]}').status_code == 202
    assert env.publisher.uploads[-1].metadata == {"year": 2026, "tags": ["x"], "tenant": "acme"}
    conflict = upload(auth("acme"), metadata='{"tenant": "globex"}')
    assert conflict.status_code == 403 and "conflicts" in conflict.json()["detail"]
    assert upload(auth("admin"), metadata='{"tenant": "globex"}').status_code == 202
    assert env.publisher.uploads[-1].metadata == {"tenant": "globex"}
    assert upload(auth("writer")).status_code == 202 and env.publisher.uploads[-1].metadata is None
    bad_json = upload(auth("admin"), metadata="{not json")
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["detail"]
    bad_value = upload(auth("admin"), metadata='{"owner": {"nested": 1}}')
    assert bad_value.status_code == 400 and "'owner'" in bad_value.json()["detail"]
    # Another tenant's document is never replaced.
    env.store.put(record("globex-1", 2, "complete", metadata={"tenant": "globex"}))
    taken = upload(auth("acme"), document_id="globex-1")
    assert taken.status_code == 409 and len(env.publisher.uploads) == 3


def test_a_body_over_the_limit_is_413_by_content_length_and_while_streaming(env: Env) -> None:
    big = b"%PDF-" + b"0" * (200 * 1024)
    declared = env.client.post("/ingest/pdf", files={"file": ("a.pdf", big)}, headers=auth("admin"))
    assert declared.status_code == 413 and "COLSTREAM_API__MAX_UPLOAD_BYTES" in declared.json()["detail"]

    def chunks() -> Iterator[bytes]:
        for _ in range(50):
            yield b"x" * 8192

    streamed = env.client.post("/search", content=chunks(),
                               headers={**auth("admin"), "Content-Type": "application/json"})
    assert streamed.status_code == 413
    assert env.publisher.uploads == [] and env.model.calls == []


def test_embed_pooled_is_the_mean_of_the_token_vectors(env: Env) -> None:
    image = base64.b64encode(png_bytes(width=64)).decode()
    multi = env.client.post("/embed", json={"image": image}, headers=auth("reader")).json()
    flat = env.client.post("/embed", params={"pooled": True}, json={"image": image}, headers=auth("reader")).json()
    assert flat["dim"] == 128 and len(flat["embedding"]) == 128 and flat["num_tokens"] == multi["num_tokens"]
    np.testing.assert_allclose(flat["embedding"], np.mean(multi["embedding"], axis=0), rtol=1e-5)


def test_every_error_is_json_with_a_message(env: Env) -> None:
    for response in (
        env.client.get("/no-such-route"),
        env.client.put("/documents", headers=auth("admin")),
        env.client.post("/search", content=b"{", headers={**auth("admin"), "Content-Type": "application/json"}),
        env.client.post("/search", json={}, headers=auth("admin")),
    ):
        assert 400 <= response.status_code < 500
        assert response.headers["content-type"] == "application/json"
        assert isinstance(response.json()["detail"], str) and len(response.json()["detail"]) > 10


def test_openapi_documents_the_error_contract(env: Env) -> None:
    schema = env.client.get("/openapi.json").json()
    assert "HTTPValidationError" not in json.dumps(schema)
    search = schema["paths"]["/search"]["post"]
    assert {"400", "401", "403", "413", "422"} <= set(search["responses"])
    assert search["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }
    assert schema["components"]["schemas"]["SearchRequest"]["additionalProperties"] is False
    assert "401" not in schema["paths"]["/health"]["get"]["responses"]


def test_tenant_keys_need_the_tenant_index(tmp_path: Path) -> None:
    settings = make_settings(tmp_path).updated(qdrant={"indexed_metadata": []})
    with pytest.raises(KeyConfigError, match="INDEXED_METADATA"):
        create_app(settings, store=FakeStore(), publisher=FakePublisher())


def test_options_eventgrid_answers_json_and_its_errors_are_documented(tmp_path: Path) -> None:
    secret = "eventgrid-secret-0123456789abcdef"
    settings = make_settings(tmp_path).updated(eventgrid={"shared_secret": secret})
    app = create_app(settings, store=FakeStore(), publisher=FakePublisher(), gpu_probe=lambda: False)
    with TestClient(app) as client:
        answered = client.options(f"/eventgrid?key={secret}", headers={"WebHook-Request-Origin": "eventgrid.azure.net"})
        assert answered.status_code == 200 and answered.headers["content-type"] == "application/json"
        assert answered.json() == {"allowed_methods": ["POST", "OPTIONS"], "allowed_origin": "eventgrid.azure.net"}
        assert answered.headers["WebHook-Allowed-Origin"] == "eventgrid.azure.net"
        refused = client.options("/eventgrid")
        assert refused.status_code == 401 and "key" in refused.json()["detail"]
        paths = client.get("/openapi.json").json()["paths"]
    assert {"401", "403"} <= set(paths["/eventgrid"]["options"]["responses"])
    assert {"400", "401", "413", "503"} <= set(paths["/eventgrid"]["post"]["responses"])
    assert paths["/documents/{document_id}"]["get"]["parameters"][0]["schema"]["pattern"].startswith("^[A-Za-z0-9]")


def test_a_wrong_key_never_hides_behind_a_right_one(env: Env) -> None:
    right, wrong = KEYS["admin"][0], "not-a-configured-key-000"
    for headers in ({"X-API-Key": wrong, "Authorization": f"Bearer {right}"},
                    {"X-API-Key": "", "Authorization": f"Bearer {right}"},
                    {"X-API-Key": KEYS["reader"][0], "Authorization": f"Bearer {right}"}):
        assert env.client.get("/documents", headers=headers).status_code == 401


def test_health_shows_stage_details_only_to_a_valid_key(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path), store=FakeStore(), publisher=FakePublisher(), gpu_probe=lambda: False,
                     stage_stats=lambda: {"sink": {"error": "RuntimeError('/var/secret/path')"}}, mount_eventgrid=False)
    with TestClient(app) as client:
        anonymous = client.get("/health")
        assert anonymous.status_code == 200 and anonymous.json()["stages"] is None
        assert client.get("/health", headers={"X-API-Key": "not-a-configured-key-000"}).json()["stages"] is None
        assert client.get("/health", headers=auth("reader")).json()["stages"] == {
            "sink": {"error": "RuntimeError('/var/secret/path')"}
        }
