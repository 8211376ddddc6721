"""Tenant isolation for the REST routes.

A key bound to tenant T sees only documents whose ``metadata.tenant`` is T: lists
drop the others, a lookup of another tenant's id answers exactly as a missing id
does, searches and counts carry a ``tenant`` filter, and uploads are stamped with
T (:func:`colstream.api.auth.tenant_metadata`). Keys without a tenant (and
``admin`` keys) span every tenant.

The tenant filter needs ``tenant`` among ``COLSTREAM_QDRANT__INDEXED_METADATA``;
:func:`check_tenant_index` refuses to start otherwise, rather than serving
unfiltered pages.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fastapi import HTTPException

from colstream.api.auth import TENANT_KEY, KeyConfigError, Principal, load_key_specs
from colstream.infra.settings import ColstreamSettings
from colstream.infra.vectorstore import PayloadFilter, UnknownFilterKey, filter_terms
from colstream.schemas.events import DocumentRecord, check_metadata


def check_tenant_index(settings: ColstreamSettings) -> None:
    """Tenant-bound keys need the tenant payload index that their searches filter on."""
    if TENANT_KEY in settings.qdrant.indexed_metadata:
        return
    if any(spec.tenant is not None for spec in load_key_specs(settings.api)):
        raise KeyConfigError(
            "API keys are bound to tenants but 'tenant' is not in COLSTREAM_QDRANT__INDEXED_METADATA; "
            "add it so searches and counts can be limited to a tenant"
        )


def visible(principal: Principal, record: DocumentRecord | None) -> DocumentRecord | None:
    """``record`` when the caller may see it, else None (exactly as if it did not exist)."""
    if record is None or not principal.sees(record.metadata):
        return None
    return record


def visible_records(principal: Principal, records: Sequence[DocumentRecord]) -> list[DocumentRecord]:
    return [record for record in records if principal.sees(record.metadata)]


def scoped_filter(principal: Principal, filter_: PayloadFilter | None) -> dict[str, Any] | None:
    """``filter_`` limited to the caller's tenant: a filter naming only other tenants matches nothing."""
    merged: dict[str, Any] = dict(filter_ or {})
    if principal.tenant is None:
        return merged or None
    asked = merged.get(TENANT_KEY)
    if asked is None:
        merged[TENANT_KEY] = principal.tenant
    else:
        values = asked if isinstance(asked, list | tuple) else [asked]
        merged[TENANT_KEY] = [principal.tenant] if principal.tenant in values else []
    return merged


def check_filter_keys(settings: ColstreamSettings, filter_: PayloadFilter | None) -> None:
    """400 naming the first key that is neither ``document_id`` nor an indexed metadata key."""
    try:
        filter_terms(settings.qdrant, filter_)
    except UnknownFilterKey as exc:
        raise HTTPException(400, str(exc)) from exc


def parse_metadata_field(raw: str | None) -> dict[str, Any] | None:
    """The ``metadata`` form field of an upload: a JSON object under the metadata contract."""
    if raw is None or not raw.strip():
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise HTTPException(
            400,
            f"the metadata field is not valid JSON ({exc.msg} at position {exc.pos}); "
            'send an object such as {"tenant": "acme"}',
        ) from exc
    if not isinstance(value, dict):
        raise HTTPException(400, f"the metadata field must be a JSON object, got {type(value).__name__}")
    try:
        return check_metadata(value)
    except ValueError as exc:
        raise HTTPException(400, f"the metadata field is refused: {exc}") from exc
