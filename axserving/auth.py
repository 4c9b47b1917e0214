"""Bearer-key authentication (pure ASGI middleware).

The key comes as ``Authorization: Bearer KEY`` or, as Anthropic's clients send it, ``x-api-key``.

Keys come from ``AXS_API_KEY`` (comma-separated). Every key is compared in constant time, and all
of them are always compared, so timing tells nothing about which key nearly matched. Health,
probes and metrics stay open for orchestrators and scrapers.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from axserving.errors import APIError, AuthenticationFailed, error_body
from axserving.middleware import scope_header

OPEN_PATHS = frozenset({"/health", "/livez", "/readyz", "/metrics", "/v1/metrics", "/openapi.json", "/dashboard"})
# Open for GET only (POST /v1/license is an admin action).
OPEN_GET_PATHS = frozenset({"/v1/license"})


def key_matches(presented: bytes, keys: tuple[bytes, ...]) -> bool:
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(presented, key)
    return ok


class BearerAuthMiddleware:
    def __init__(
        self, app: ASGIApp, keys: tuple[str, ...], on_failure: Callable[[Scope, APIError], None] | None = None
    ) -> None:
        """``on_failure``: told of every refused request (the audit trail)."""
        self.app = app
        self.keys = tuple(k.encode() for k in keys)
        self.on_failure = on_failure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        if (
            scope["type"] != "http" or not self.keys or path in OPEN_PATHS
            or (path in OPEN_GET_PATHS and scope["method"] in ("GET", "HEAD"))
        ):
            await self.app(scope, receive, send)
            return
        header = scope_header(scope, b"authorization")
        scheme, _, token = header.partition(b" ")
        if not header and (api_key := scope_header(scope, b"x-api-key")):
            header, scheme, token = api_key, b"bearer", api_key  # Anthropic's clients send x-api-key
        if not header:
            err = AuthenticationFailed(
                "You didn't provide an API key. Provide it in the Authorization header as 'Bearer KEY'."
            )
        elif scheme.lower() != b"bearer" or not key_matches(token.strip(), self.keys):
            err = AuthenticationFailed("Incorrect API key provided.")
        else:
            await self.app(scope, receive, send)
            return
        if self.on_failure is not None:
            self.on_failure(scope, err)
        body = error_body(err, scope["path"])
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
