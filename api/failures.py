"""What a client may learn of a server-side failure: its kind, never a server path.

Exceptions from the file system, the blob store or a client library often name
files (``[Errno 36] File name too long: '/var/lib/colstream/blobs/...'``).
:func:`public_reason` keeps the exception's type and message with every absolute
path and ``file://`` URI replaced by ``<path>``, so a 503 says what failed
without describing the server's layout. The full exception goes to the log.
"""

from __future__ import annotations

import re

# file:// URIs, then absolute POSIX paths (after a start, a space, a quote, '=' or '(')
# and Windows drive paths.
_FILE_URI = re.compile(r"file://[^\s'\"]*")
_POSIX_PATH = re.compile(r"(?:(?<=^)|(?<=[\s'\"=(\[,]))/[^\s'\"]*")
_WINDOWS_PATH = re.compile(r"\b[A-Za-z]:\\[^\s'\"]*")


def scrub_paths(text: str) -> str:
    text = _FILE_URI.sub("<path>", text)
    text = _WINDOWS_PATH.sub("<path>", text)
    return _POSIX_PATH.sub("<path>", text)


def public_reason(exc: BaseException) -> str:
    """``"<Type>: <message without paths>"`` for an HTTP error body."""
    message = scrub_paths(str(exc))[:500]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


_OWNED_FOLDERS = ("/uploads/", "/claims/")


def public_blob_uri(uri: str | None) -> str | None:
    """A blob URI as a client may see it: cloud URIs as they are (their queries are already
    gone), local ``file://`` URIs as ``local:<name in the blob root>`` or not at all."""
    if uri is None or not uri.startswith("file:"):
        return uri
    for folder in _OWNED_FOLDERS:
        at = uri.find(folder)
        if at >= 0:
            return "local:" + uri[at + 1 :]
    return None
