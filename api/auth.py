"""API keys: who is calling, what they may do, and whose documents they see.

Keys come from ``COLSTREAM_API__KEYS`` (a JSON list of key specs) and
``COLSTREAM_API__KEYS_FILE`` (the same list in a file, e.g. a mounted Kubernetes
Secret). A spec gives the key in clear (``key``) or as its hex SHA-256
(``key_sha256``), its scopes, and optionally the tenant it is bound to.

Only SHA-256 digests are kept in memory. A presented key is hashed and compared
with every known digest in constant time, so neither the comparison nor the
position of a match leaks through timing. Keys are never logged or echoed.

Scopes:

* ``read``: ``GET /documents``, ``GET /documents/{id}``, ``/stats``, ``/search``, ``/embed*``;
* ``write``: every ``/ingest/*`` route;
* ``delete``: ``DELETE /document/{id}``;
* ``admin``: all of the above across every tenant, and the dead-letter routes.

A key bound to a tenant sees only documents whose ``metadata.tenant`` is that
tenant; anything else answers exactly as a missing document does.

With no key configured the API serves loopback only (one warning), unless
``COLSTREAM_API__ALLOW_UNAUTHENTICATED=true`` allows another address.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import TypeAdapter, ValidationError

from colstream.infra.settings import ApiKeySpec, ApiScope, ApiSettings

log = logging.getLogger(__name__)

TENANT_KEY = "tenant"
ALL_SCOPES: frozenset[str] = frozenset({"read", "write", "delete", "admin"})
WWW_AUTHENTICATE = 'Bearer realm="colstream"'
HOW_TO_SEND = "send it as 'Authorization: Bearer <key>' or as 'X-API-Key: <key>'"

_SPECS: TypeAdapter[list[ApiKeySpec]] = TypeAdapter(list[ApiKeySpec])
_warned: set[str] = set()
_warn_lock = threading.Lock()


class KeyConfigError(RuntimeError):
    """The configured keys cannot be used; the API refuses to start."""


class UnauthenticatedBind(RuntimeError):
    """The API would serve a non-loopback address with no key configured."""


@dataclass(frozen=True)
class Principal:
    """The caller, as far as authorization is concerned."""

    scopes: frozenset[str]
    tenant: str | None
    authenticated: bool
    name: str | None = None

    def allows(self, scope: ApiScope) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    def sees(self, metadata: Mapping[str, Any] | None) -> bool:
        """Whether a document with this metadata belongs to what the caller may see."""
        if self.tenant is None:
            return True
        return (metadata or {}).get(TENANT_KEY) == self.tenant


# Without keys (the loopback default) every caller may do everything.
OPEN_ACCESS = Principal(scopes=ALL_SCOPES, tenant=None, authenticated=False)


@dataclass(frozen=True)
class _KnownKey:
    digest: bytes
    principal: Principal


def _digest(spec: ApiKeySpec) -> bytes:
    if spec.key is not None:
        return hashlib.sha256(spec.key.get_secret_value().encode("utf-8")).digest()
    assert spec.key_sha256 is not None
    return bytes.fromhex(spec.key_sha256.get_secret_value())


def _validation_summary(exc: ValidationError) -> str:
    # Locations and messages only: the input holds the keys.
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()[:5])


def load_key_specs(api: ApiSettings) -> list[ApiKeySpec]:
    """``api.keys`` plus the keys file, validated by the same rules."""
    specs = list(api.keys)
    if api.keys_file is not None:
        try:
            raw = api.keys_file.read_bytes()
        except OSError as exc:
            raise KeyConfigError(f"cannot read COLSTREAM_API__KEYS_FILE {api.keys_file}: {exc.strerror}") from None
        try:
            specs.extend(_SPECS.validate_json(raw))
        except ValidationError as exc:
            raise KeyConfigError(
                f"COLSTREAM_API__KEYS_FILE {api.keys_file} must hold a JSON list of key specs "
                f'({{"key" or "key_sha256", "scopes", "tenant"}}): {_validation_summary(exc)}'
            ) from None
    return specs


class KeyRing:
    """The configured keys, as digests, and the principal each one stands for."""

    def __init__(self, specs: Sequence[ApiKeySpec]) -> None:
        known: list[_KnownKey] = []
        for spec in specs:
            principal = Principal(
                scopes=frozenset(spec.scopes), tenant=spec.tenant, authenticated=True, name=spec.name
            )
            digest = _digest(spec)
            if any(hmac.compare_digest(digest, other.digest) for other in known):
                label = f" ({spec.name})" if spec.name else ""
                raise KeyConfigError(f"the same API key is configured twice{label}; each key needs one spec")
            known.append(_KnownKey(digest, principal))
        self._known = tuple(known)

    @classmethod
    def from_settings(cls, api: ApiSettings) -> KeyRing:
        return cls(load_key_specs(api))

    @property
    def enabled(self) -> bool:
        return bool(self._known)

    def __len__(self) -> int:
        return len(self._known)

    def identify(self, presented: str) -> Principal | None:
        """The principal of ``presented``, or None. Every digest is compared, match or not."""
        digest = hashlib.sha256(presented.encode("utf-8", errors="surrogateescape")).digest()
        found: Principal | None = None
        for known in self._known:
            if hmac.compare_digest(digest, known.digest):
                found = known.principal
        return found


def _warn_once(key: str, message: str, *args: Any) -> None:
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(message, *args)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_host(api: ApiSettings, ring: KeyRing) -> str:
    """The address to serve: refuses a non-loopback one without keys unless explicitly allowed."""
    host = api.host or ("0.0.0.0" if ring.enabled else "127.0.0.1")
    if ring.enabled:
        return host
    if is_loopback(host):
        _warn_once(
            "loopback",
            "api: no API keys configured: serving %s (loopback) only, every route open to local callers; "
            "set COLSTREAM_API__KEYS or COLSTREAM_API__KEYS_FILE to serve other addresses",
            host,
        )
        return host
    if api.allow_unauthenticated:
        _warn_once(
            "unauthenticated",
            "api: serving %s WITHOUT authentication (COLSTREAM_API__ALLOW_UNAUTHENTICATED=true): anyone who "
            "can reach it may ingest, search and delete",
            host,
        )
        return host
    raise UnauthenticatedBind(
        f"refusing to serve {host} without API keys: set COLSTREAM_API__KEYS or COLSTREAM_API__KEYS_FILE, "
        "bind 127.0.0.1 (COLSTREAM_API__HOST), or set COLSTREAM_API__ALLOW_UNAUTHENTICATED=true"
    )


_bearer = HTTPBearer(auto_error=False, description="An API key as a bearer token.")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key.")

Dependency = Callable[..., Awaitable[Principal]]


def unauthorized(message: str, error: str | None = None) -> HTTPException:
    challenge = WWW_AUTHENTICATE + (f', error="{error}"' if error else "")
    return HTTPException(401, message, headers={"WWW-Authenticate": challenge})


class Authenticator:
    """FastAPI dependencies that authenticate the caller and check one scope."""

    def __init__(self, ring: KeyRing) -> None:
        self.ring = ring

    def principal(
        self, request: Request, api_key: str | None, bearer: HTTPAuthorizationCredentials | None
    ) -> Principal:
        if not self.ring.enabled:
            return OPEN_ACCESS
        presented = [key for key in (api_key, bearer.credentials if bearer is not None else None) if key]
        if "x-api-key" in request.headers and not api_key:
            raise unauthorized(f"the X-API-Key header is empty; {HOW_TO_SEND}", "invalid_request")
        if not presented:
            if request.headers.get("authorization"):
                raise unauthorized(f"the Authorization header is not a Bearer token; {HOW_TO_SEND}", "invalid_request")
            raise unauthorized(f"this route needs an API key; {HOW_TO_SEND}")
        # Every key presented must be valid: a wrong one never hides behind a right one.
        principals = [self.ring.identify(key) for key in presented]
        if any(principal is None for principal in principals):
            raise unauthorized("the API key is not valid; check it against the configured keys", "invalid_token")
        if len(set(principals)) > 1:
            raise unauthorized(f"two different API keys were sent; {HOW_TO_SEND}, not both", "invalid_request")
        principal = principals[0]
        assert principal is not None
        return principal

    def optional(self, request: Request) -> Principal | None:
        """The caller when it presented a valid key (or no keys are configured), else None."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        bearer = None
        if scheme.lower() == "bearer" and token:
            bearer = HTTPAuthorizationCredentials(scheme="Bearer", credentials=token)
        try:
            return self.principal(request, request.headers.get("x-api-key"), bearer)
        except HTTPException:
            return None

    def require(self, scope: ApiScope) -> Dependency:
        async def dependency(
            request: Request,
            api_key: str | None = Depends(_api_key_header),
            bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
        ) -> Principal:
            principal = self.principal(request, api_key, bearer)
            if not principal.allows(scope):
                held = ", ".join(sorted(principal.scopes))
                raise HTTPException(
                    403,
                    f"this API key lacks the '{scope}' scope that {request.method} {request.url.path} needs "
                    f"(it holds: {held}); use a key with '{scope}' or 'admin'",
                )
            request.state.principal = principal
            return principal

        return dependency


def tenant_metadata(principal: Principal, metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """An upload's metadata under ``principal``: a tenant-bound key stamps its tenant, and
    a request naming another tenant is refused."""
    merged = dict(metadata) if metadata else {}
    if principal.tenant is None:
        return merged or None
    given = merged.get(TENANT_KEY)
    if given is not None and given != principal.tenant:
        raise HTTPException(
            403,
            f"metadata.tenant {given!r} conflicts with this API key's tenant {principal.tenant!r}; "
            "omit metadata.tenant (it is set from the key) or use a key of that tenant",
        )
    merged[TENANT_KEY] = principal.tenant
    return merged
