"""Headers every response carries: ``X-Request-ID`` (the client's, else a new one) and the
security headers the reference server sends."""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_SAFE_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
_STATIC = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY")]


def scope_header(scope: Scope, name: bytes) -> bytes:
    """The first value of a request header (``name`` lower-case), or b""."""
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return b""


class ResponseHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = scope_header(scope, b"x-request-id")
        if not _SAFE_ID.match(request_id):
            request_id = uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = request_id.decode()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id))
                headers.extend(_STATIC)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
