"""Names of the blobs colstream itself stores, and how to recognise them.

A document id may be 256 characters with ``/`` between segments; file systems
allow 255 bytes per path component and Azure 1,024 characters per blob name. So
an id is never used verbatim as a directory: each document gets one directory
named by a readable prefix of its id and a digest of the whole id::

    uploads/<readable prefix, <= 48 chars>-<sha256(id), 32 hex>/<uuid4 hex>/<file name, <= 200 chars>

Every component fits any file system, the name is at most ~300 characters, and
two ids never share a directory (the digest covers the whole id). The uuid makes
every version's blob immutable: an older version still in the pipeline never
reads a newer upload's bytes.

Blobs under :data:`UPLOADS_PREFIX` (API and CLI uploads) and in the claim-check
container are colstream's own, and only those are ever removed by colstream
(:mod:`colstream.infra.blob_gc`); a blob a user's own URI points at is never
touched.
"""

from __future__ import annotations

import hashlib
import re
import uuid

UPLOADS_PREFIX = "uploads/"
CLAIMS_PREFIX = "claims/"
_READABLE_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
READABLE_PREFIX_CHARS = 48
DIGEST_HEX_CHARS = 32
MAX_FILE_NAME_CHARS = 200


def document_digest(document_id: str) -> str:
    return hashlib.sha256(document_id.encode("utf-8")).hexdigest()[:DIGEST_HEX_CHARS]


def document_blob_dir(document_id: str) -> str:
    """``uploads/<prefix>-<digest>``: where every uploaded version of one document lives."""
    readable = _READABLE_CHARS.sub("_", document_id)[:READABLE_PREFIX_CHARS].strip("_") or "doc"
    return f"{UPLOADS_PREFIX}{readable}-{document_digest(document_id)}"


_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._ -]+")


def safe_file_name(name: str, fallback: str = "upload") -> str:
    """A file name any store accepts: conservative characters, no leading or trailing dots."""
    return _UNSAFE_FILE_CHARS.sub("_", name).strip(" .")[:MAX_FILE_NAME_CHARS].strip(" .") or fallback


def upload_blob_name(document_id: str, file_name: str) -> str:
    """A fresh blob name for one uploaded version of ``document_id``."""
    name = safe_file_name(file_name)
    return f"{document_blob_dir(document_id)}/{uuid.uuid4().hex}/{name}"


def claim_blob_dir(document_id: str, version: int) -> str:
    """``claims/<document dir>/v<version>``: where one version's claim-check page images live."""
    return f"{CLAIMS_PREFIX}{document_blob_dir(document_id).removeprefix(UPLOADS_PREFIX)}/v{version}"


def is_owned_upload_name(name: str) -> bool:
    return name.startswith(UPLOADS_PREFIX)
