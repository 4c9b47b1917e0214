"""Headers every response carries: ``X-Request-ID`` (the client's when it is a sane token, else a
new one; asgi-correlation-id keeps it in a context variable for the request's log lines and its
engine record) and the security headers."""

from __future__ import annotations

import re
import uuid

from asgi_correlation_id import CorrelationIdMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_STATIC = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


def scope_header(scope: Scope, name: bytes) -> bytes:
    """The first value of a request header (``name`` lower-case), or b""."""
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return b""


def request_id_middleware(app: ASGIApp) -> ASGIApp:
    return CorrelationIdMiddleware(
        app,
        header_name="X-Request-ID",
        generator=lambda: uuid.uuid4().hex,
        validator=lambda value: bool(_SAFE_ID.match(value)),
        transformer=None,
    )


class ResponseHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_STATIC]
            await send(message)

        await self.app(scope, receive, send_with_headers)
