"""The one rule for document ids, shared by every entry point.

REST paths and forms, the CLI, Kafka records and Event Grid deliveries all check
ids here, so an id accepted anywhere is accepted everywhere and names the same
document everywhere. Document ids end up in Kafka keys, Qdrant payloads, blob
names and log lines, so the rule is strict:

* 1 to 256 characters, the whole string matched (no trailing newline slips past);
* letters, digits and ``._:@=+-``, with ``/`` separating non-empty segments;
* the first character is a letter or a digit;
* no ``..`` anywhere and no segment that is just ``.``, so ``a//b``, ``a/``,
  ``a/./b`` and ``a/../b`` are refused before they reach a store;
* no control characters, no whitespace, nothing outside ASCII.

The pattern avoids look-arounds so JSON Schema validators and test generators in
any language read it the same way.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

DOCUMENT_ID_MAX_LENGTH = 256

_SEGMENT_CHARS = r"[A-Za-z0-9_:@=+-]"
# A segment: no two dots in a row and at least one non-dot character.
_FIRST_SEGMENT = rf"[A-Za-z0-9]{_SEGMENT_CHARS}*(?:\.{_SEGMENT_CHARS}+)*\.?"
_SEGMENT = rf"\.?{_SEGMENT_CHARS}+(?:\.{_SEGMENT_CHARS}+)*\.?"
DOCUMENT_ID_PATTERN = rf"^{_FIRST_SEGMENT}(?:/{_SEGMENT})*$"
_DOCUMENT_ID_RE = re.compile(DOCUMENT_ID_PATTERN.removeprefix("^").removesuffix("$"))

DOCUMENT_ID_RULE = (
    "document_id must be 1-256 characters of letters, digits and ._:@=+- with '/' between "
    "non-empty segments, starting with a letter or digit, without '..' or '.' segments, "
    "whitespace or control characters"
)


class InvalidDocumentId(ValueError):
    """An id that breaks :data:`DOCUMENT_ID_PATTERN`; the message says the rule."""


def is_valid_document_id(value: object) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= DOCUMENT_ID_MAX_LENGTH
        and _DOCUMENT_ID_RE.fullmatch(value) is not None
    )


def check_document_id(value: str) -> str:
    """Return ``value`` when it is a valid document id, else raise :class:`InvalidDocumentId`."""
    if not is_valid_document_id(value):
        shown = repr(value[:80]) if isinstance(value, str) else type(value).__name__
        raise InvalidDocumentId(f"{DOCUMENT_ID_RULE}; got {shown}")
    return value


def document_id_json_schema() -> dict[str, object]:
    return {"type": "string", "minLength": 1, "maxLength": DOCUMENT_ID_MAX_LENGTH, "pattern": DOCUMENT_ID_PATTERN}


DocumentId = Annotated[
    str,
    AfterValidator(check_document_id),
    Field(
        description="Stable id of the document (see the id rule in the pattern).",
        json_schema_extra={"minLength": 1, "maxLength": DOCUMENT_ID_MAX_LENGTH, "pattern": DOCUMENT_ID_PATTERN},
    ),
]
