"""`colstream search`: filter parsing, and the API path it takes while `run all` serves."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from colstream.cli.search import SearchError, parse_filters, run_search
from colstream.infra.settings import ColstreamSettings


def test_filters_parse_to_values_and_lists() -> None:
    assert parse_filters(["tenant=acme"]) == {"tenant": "acme"}
    assert parse_filters(["tenant=acme,globex", "year:=2026"]) == {"tenant": ["acme", "globex"], "year": 2026}
    assert parse_filters(["tags=a", "tags=b"]) == {"tags": ["a", "b"]}
    assert parse_filters(["flag:=true", "ids:=[\"x\", \"y\"]"]) == {"flag": True, "ids": ["x", "y"]}
    for bad in ("tenant", "=x", "year:=20x"):
        with pytest.raises(SearchError):
            parse_filters([bad])


def test_search_goes_through_the_running_api_with_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    result = {"document_id": "a1", "page_number": 2, "score": 0.5, "metadata": {"tenant": "acme"}, "model": "m"}

    def post(url: str, json: dict[str, Any], headers: dict[str, str], timeout: float) -> httpx.Response:
        seen.update(url=url, json=json, headers=headers)
        return httpx.Response(200, json={"results": [result], "query": "q", "model": "m"})

    monkeypatch.setattr(httpx, "post", post)
    monkeypatch.setenv("COLSTREAM_API_KEY", "reader-key-000000000000")
    settings = ColstreamSettings().updated(api={"public_url": "http://127.0.0.1:9"})
    assert run_search(settings, "q", ["tenant=acme"], 5) == [result]
    assert seen == {"url": "http://127.0.0.1:9/search",
                    "json": {"query": "q", "top_k": 5, "filter": {"tenant": "acme"}},
                    "headers": {"Authorization": "Bearer reader-key-000000000000"}}

    monkeypatch.setattr(httpx, "post", lambda *a, **k: httpx.Response(400, json={"detail": "unknown filter key 'x'"}))
    with pytest.raises(SearchError, match="unknown filter key 'x'"):
        run_search(settings, "q", ["x=1"], 5)


def test_without_an_api_an_unknown_filter_key_is_refused_before_opening_the_store(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    def refuse(*_: Any, **__: Any) -> httpx.Response:
        raise httpx.ConnectError("nothing listens")

    monkeypatch.setattr(httpx, "post", refuse)
    settings = ColstreamSettings(state_dir=tmp_path)
    with pytest.raises(SearchError, match="'colour'"):
        run_search(settings, "q", ["colour=red"], 5)


def test_serving_another_address_without_keys_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    from colstream.cli.main import main

    monkeypatch.setenv("COLSTREAM_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    monkeypatch.setenv("COLSTREAM_API__HOST", "0.0.0.0")
    monkeypatch.delenv("COLSTREAM_API__KEYS", raising=False)
    monkeypatch.delenv("COLSTREAM_API__ALLOW_UNAUTHENTICATED", raising=False)
    assert main(["run", "api"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "refusing to serve 0.0.0.0 without API keys" in err and "Traceback" not in err
