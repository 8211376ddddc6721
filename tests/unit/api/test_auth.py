"""API keys: parsing, lookup by digest, scopes, tenants and the bind policy."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fastapi import HTTPException
from pydantic import SecretStr, ValidationError

from colstream.api.auth import (
    KeyConfigError,
    KeyRing,
    UnauthenticatedBind,
    bind_host,
    load_key_specs,
    tenant_metadata,
)
from colstream.infra.settings import ApiKeySpec, ApiSettings, ColstreamSettings

READER = "reader-key-0123456789abcdef"
ADMIN = "admin-key-0123456789abcdef"


def ring() -> KeyRing:
    return KeyRing([
        ApiKeySpec(key=SecretStr(READER), scopes=["read"], tenant="acme"),
        ApiKeySpec(key_sha256=SecretStr(hashlib.sha256(ADMIN.encode()).hexdigest()), scopes=["admin"]),
    ])


def test_keys_given_in_clear_or_as_sha256_identify_their_principal() -> None:
    keys = ring()
    reader, admin = keys.identify(READER), keys.identify(ADMIN)
    assert reader is not None
    assert (reader.tenant, reader.allows("read"), reader.allows("write")) == ("acme", True, False)
    assert admin is not None and admin.tenant is None and all(admin.allows(s) for s in ("read", "write", "delete"))
    assert keys.identify("not-a-configured-key-at-all") is None


def test_admin_with_a_tenant_is_refused_and_the_error_never_shows_the_key() -> None:
    with pytest.raises(ValidationError) as caught:
        ColstreamSettings().updated(api={"keys": [{"key": ADMIN, "scopes": ["admin"], "tenant": "acme"}]})
    assert "admin spans every tenant" in str(caught.value)
    assert ADMIN not in str(caught.value)


def test_keys_file_adds_keys_and_reports_bad_ones_without_their_value(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(f'[{{"key": "{READER}", "scopes": ["write"], "tenant": "globex"}}]')
    specs = load_key_specs(ApiSettings(keys_file=path))
    assert [(s.scopes, s.tenant) for s in specs] == [(["write"], "globex")]
    path.write_text(f'[{{"key": "{READER}", "scopes": ["root"]}}]')
    with pytest.raises(KeyConfigError) as caught:
        load_key_specs(ApiSettings(keys_file=path))
    assert READER not in str(caught.value)


def test_bind_policy_without_keys() -> None:
    empty = KeyRing([])
    assert bind_host(ApiSettings(), empty) == "127.0.0.1"
    with pytest.raises(UnauthenticatedBind, match="COLSTREAM_API__ALLOW_UNAUTHENTICATED"):
        bind_host(ApiSettings(host="0.0.0.0"), empty)
    assert bind_host(ApiSettings(host="0.0.0.0", allow_unauthenticated=True), empty) == "0.0.0.0"
    assert bind_host(ApiSettings(), ring()) == "0.0.0.0"


def test_tenant_keys_stamp_their_tenant_and_refuse_another() -> None:
    reader = ring().identify(READER)
    assert reader is not None
    assert tenant_metadata(reader, {"year": 2026}) == {"year": 2026, "tenant": "acme"}
    with pytest.raises(HTTPException) as caught:
        tenant_metadata(reader, {"tenant": "globex"})
    assert caught.value.status_code == 403
    assert reader.sees({"tenant": "acme"}) and not reader.sees({"tenant": "globex"}) and not reader.sees(None)
