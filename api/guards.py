"""ASGI guards that run before routing.

Starlette's path parameters match with ``.*`` and a ``$`` anchor, and ``$``
also matches before a final newline: ``/document/abc%0A`` would route with
``document_id == "abc"``, another document. Control characters are never part of
a valid path, so such a request is refused before any route sees it.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send


class RejectControlCharactersInPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in scope.get("path", "")):
            body = json.dumps({"detail": "the request path contains control characters"}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 422,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
