"""URIs as colstream stores, logs and returns them: never with a query string.

A blob URL's query is where Azure puts a SAS signature. colstream takes its
credentials from settings, so a query in an event is refused (see
:class:`~colstream.schemas.events.UploadEvent`), and anything that still carries
one (an old record, a dead letter's original value, an error message) is shown
with the query replaced by ``?<redacted>``.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

REDACTED = "<redacted>"
# A URI inside free text: up to whitespace or a quote, so JSON strings stay intact.
_URI_WITH_QUERY = re.compile(r"""(?P<base>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s"'?#<>]*)(?P<rest>[?#][^\s"'<>]*)""")


def redact_uri(uri: str) -> str:
    """``uri`` without its query and fragment (``?<redacted>`` marks that one was there)."""
    cut = min((i for i in (uri.find("?"), uri.find("#")) if i >= 0), default=-1)
    if cut < 0:
        return uri
    return f"{uri[:cut]}?{REDACTED}"


def strip_query(uri: str) -> str:
    """``uri`` without its query and fragment, for values that must stay usable URIs."""
    cut = min((i for i in (uri.find("?"), uri.find("#")) if i >= 0), default=-1)
    return uri if cut < 0 else uri[:cut]


def redact_uris_in_text(text: str) -> str:
    """Every URI in ``text`` with its query replaced by ``?<redacted>``."""
    return _URI_WITH_QUERY.sub(lambda m: f"{m['base']}?{REDACTED}", text)


def uri_basename(uri: str) -> str:
    """The last path segment of ``uri``: a file name never comes from a query."""
    path = urlsplit(strip_query(uri)).path if "://" in uri else strip_query(uri)
    return unquote(path.rstrip("/").rsplit("/", 1)[-1])
