"""`colstream run all` with API keys, on the real broker: the 401/403 matrix route by scope,
two tenants kept apart on list, get, search, stats and delete, metadata filters (REST, kcat
and the CLI), a 400 for an unknown filter key, and a 413."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from colstream.infra.settings import ColstreamSettings
from tests.fixtures.docs import make_image, make_pdf
from tests.harness import REPO, kcat_produce, settings_env, upload_line, wait_for
from tests.integration.test_user_flows import colstream, on_free_port

pytestmark = pytest.mark.kafka

KEYS = {
    "reader": ("it-reader-key-0000000000", ["read"], None),
    "writer": ("it-writer-key-0000000000", ["write"], None),
    "deleter": ("it-deleter-key-000000000", ["delete"], None),
    "admin": ("it-admin-key-00000000000", ["admin"], None),
    "acme": ("it-acme-key-000000000000", ["read", "write", "delete"], "acme"),
    "globex": ("it-globex-key-0000000000", ["read", "write", "delete"], "globex"),
}
MAX_UPLOAD = 2 * 1024 * 1024
# Generous: on a loaded machine the model load alone can take minutes.
START_S = 600
WAIT_S = 600


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name][0]}"}


def keys_env(tmp_path: Path) -> dict[str, str]:
    # Half the keys in COLSTREAM_API__KEYS, half in a keys file (as a mounted Secret gives them).
    specs = [{"key": key, "scopes": scopes, "tenant": tenant, "name": name}
             for name, (key, scopes, tenant) in KEYS.items()]
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps(specs[3:]))
    return {"COLSTREAM_API__KEYS": json.dumps(specs[:3]), "COLSTREAM_API__KEYS_FILE": str(keys_file),
            "COLSTREAM_API__MAX_UPLOAD_BYTES": str(MAX_UPLOAD)}


@contextmanager
def run_all(settings: ColstreamSettings, log: Path, extra_env: dict[str, str]) -> Iterator[str]:
    """``colstream run all`` with keys; /health answers (open) once it serves."""
    env = {**settings_env(settings), "COLSTREAM_API__HOST": "127.0.0.1", **extra_env}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "colstream", "run", "all"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO)
        try:
            def up() -> bool:
                try:
                    return httpx.get(f"{settings.api.public_url}/health", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return proc.poll() is not None
            wait_for(up, START_S, what="run all /health")
            assert proc.poll() is None, log.read_text()[-3000:]
            yield settings.api.public_url
        finally:
            proc.terminate()
            proc.wait(60)


def ingest(api: str, name: str, document_id: str, pages: int = 1, metadata: dict[str, Any] | None = None,
           wait: bool = True) -> httpx.Response:
    data = {"document_id": document_id}
    if metadata is not None:
        data["metadata"] = json.dumps(metadata)
    return httpx.post(f"{api}/ingest/pdf", params={"wait": wait, "timeout_s": WAIT_S}, data=data, headers=auth(name),
                      files={"file": (f"{document_id}.pdf", make_pdf(pages), "application/pdf")}, timeout=WAIT_S + 60)


def listed(api: str, name: str) -> set[str]:
    response = httpx.get(f"{api}/documents", headers=auth(name), timeout=10)
    assert response.status_code == 200, response.text
    return {d["document_id"] for d in response.json()}


def search(api: str, name: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{api}/search", json={"query": "page", "top_k": 20, **body}, headers=auth(name), timeout=300)


def test_keys_scopes_tenants_filters_and_limits_over_the_pipeline(
    pipeline_settings: ColstreamSettings, tmp_path: Path
) -> None:
    settings = on_free_port(pipeline_settings)
    with run_all(settings, tmp_path / "run-all.log", extra_env=keys_env(tmp_path)) as api:
        health = httpx.get(f"{api}/health", timeout=10).json()  # open for probes
        assert health["status"] == "healthy" and health["gpu_available"] in (True, False)

        # -- two tenants, through REST and through kcat
        acme = ingest(api, "acme", "acme-report", pages=2, metadata={"year": 2026, "tags": ["q1"]})
        assert acme.status_code == 200, acme.text
        assert acme.json()["tokens_per_page"] > 0
        assert ingest(api, "globex", "globex-report", pages=3).status_code == 200
        conflict = ingest(api, "acme", "acme-other", metadata={"tenant": "globex"})
        assert conflict.status_code == 403 and "conflicts" in conflict.json()["detail"]
        path = settings.blob.local_root / "from-kcat.pdf"
        path.write_bytes(make_pdf(1))
        kcat_produce(settings, settings.topics.uploads,
                     [upload_line("globex-kcat", path.resolve().as_uri(), metadata={"tenant": "globex"})])
        def kcat_state() -> str | None:
            rows = httpx.get(f"{api}/documents", headers=auth("admin"), timeout=10).json()
            return next((r["state"] for r in rows if r["document_id"] == "globex-kcat"), None)

        wait_for(lambda: kcat_state() == "complete", WAIT_S, what="kcat upload indexed")

        assert listed(api, "acme") == {"acme-report"}
        assert listed(api, "globex") == {"globex-report", "globex-kcat"}
        assert listed(api, "admin") == {"acme-report", "globex-report", "globex-kcat"}
        mine = httpx.get(f"{api}/documents/acme-report", headers=auth("acme"), timeout=10).json()
        assert mine["metadata"] == {"year": 2026, "tags": ["q1"], "tenant": "acme"}
        other = httpx.get(f"{api}/documents/globex-report", headers=auth("acme"), timeout=10)
        missing = httpx.get(f"{api}/documents/no-such-doc", headers=auth("acme"), timeout=10)
        assert other.status_code == missing.status_code == 404
        assert other.json()["detail"] == missing.json()["detail"].replace("no-such-doc", "globex-report")

        stats = {name: httpx.get(f"{api}/stats", headers=auth(name), timeout=10).json()["total_vectors"]
                 for name in ("acme", "globex", "admin")}
        assert stats == {"acme": 2, "globex": 4, "admin": 6}

        def found(name: str, **body: Any) -> set[str]:
            response = search(api, name, **body)
            assert response.status_code == 200, response.text
            return {r["document_id"] for r in response.json()["results"]}

        assert found("acme") == {"acme-report"}
        assert found("acme", filter={"tenant": "globex"}) == set()
        assert found("admin", filter={"tenant": "globex"}) == {"globex-report", "globex-kcat"}
        assert found("admin", filter={"tenant": ["acme", "globex"], "document_id": ["acme-report", "globex-kcat"]}) \
            == {"acme-report", "globex-kcat"}
        result = search(api, "acme", top_k=1).json()["results"][0]
        assert set(result) == {"document_id", "page_number", "score", "metadata", "model"}
        assert result["metadata"]["tenant"] == "acme" and result["model"]
        unknown = search(api, "admin", filter={"colour": "red"})
        assert unknown.status_code == 400 and "'colour'" in unknown.json()["detail"]

        # -- the CLI, through the running API with a key from the environment
        out = colstream(settings, "search", "page", "--filter", "tenant=globex", "--top-k", "5", "--json",
                        COLSTREAM_API_KEY=KEYS["admin"][0])
        assert {r["document_id"] for r in json.loads(out)} == {"globex-report", "globex-kcat"}

        # -- the 401/403 matrix, route by scope
        image = base64.b64encode(make_image("PNG", (64, 64))).decode()
        routes: list[tuple[str, str, dict[str, Any], str]] = [
            ("GET", "/documents", {}, "read"),
            ("GET", "/documents/acme-report", {}, "read"),
            ("GET", "/stats", {}, "read"),
            ("POST", "/search", {"json": {"query": "page"}}, "read"),
            ("POST", "/embed", {"json": {"image": image}}, "read"),
            ("POST", "/embed_batch", {"json": {"images": [image]}}, "read"),
            ("POST", "/embed/query", {"json": {"text": "page"}}, "read"),
            ("POST", "/ingest/pdf?wait=false",
             {"files": {"file": ("m.pdf", make_pdf(1), "application/pdf")}}, "write"),
            ("POST", "/ingest/image?wait=false",
             {"files": {"file": ("m.png", make_image("PNG", (64, 64)), "image/png")}}, "write"),
            ("DELETE", "/document/acme-report", {}, "delete"),
        ]
        with httpx.Client(base_url=api, timeout=300) as client:
            for method, route, kwargs, scope in routes:
                no_key = client.request(method, route, **kwargs)
                assert no_key.status_code == 401, (route, no_key.text)
                assert no_key.headers["www-authenticate"].startswith("Bearer")
                assert "API key" in no_key.json()["detail"]
                bad_key = client.request(method, route, headers={"X-API-Key": "it-unknown-key-00000000"}, **kwargs)
                assert bad_key.status_code == 401, route
                holder = {"read": "reader", "write": "writer", "delete": "deleter"}[scope]
                for name in ("reader", "writer", "deleter"):
                    if name == holder:
                        continue
                    refused = client.request(method, route, headers=auth(name), **kwargs)
                    assert refused.status_code == 403, (route, name, refused.text)
                    assert f"'{scope}' scope" in refused.json()["detail"]
                if method != "DELETE":
                    allowed = client.request(method, route, headers=auth(holder), **kwargs)
                    assert allowed.status_code < 400, (route, allowed.text)

        # -- delete: another tenant's document is not there; one's own goes
        refused = httpx.delete(f"{api}/document/globex-report", headers=auth("acme"), timeout=30)
        assert refused.status_code == 404
        gone = httpx.delete(f"{api}/document/acme-report", params={"wait": True, "timeout_s": WAIT_S},
                            headers=auth("acme"), timeout=WAIT_S + 60)
        assert gone.status_code == 200, gone.text
        assert listed(api, "acme") == set() and "globex-report" in listed(api, "globex")

        # -- a body over COLSTREAM_API__MAX_UPLOAD_BYTES is refused before it is stored
        big = httpx.post(f"{api}/ingest/pdf", headers=auth("admin"), timeout=60,
                         files={"file": ("big.pdf", b"%PDF-1.4\n" + b"0" * (MAX_UPLOAD + 1), "application/pdf")})
        assert big.status_code == 413 and "MAX_UPLOAD_BYTES" in big.json()["detail"]
