"""What every response gets: ``X-Request-ID`` (the client's when it is a sane token, else a
new one; asgi-correlation-id keeps it in a context variable for the request's log lines and its
engine record), the security headers, and its count in ``axs_requests_total``."""

from __future__ import annotations

import contextvars
import re
import uuid

from asgi_correlation_id import CorrelationIdMiddleware
from prometheus_client import Counter
from starlette.routing import BaseRoute, Match
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


class ResponseRecord:
    """What the counter says of a response, filled in by the inference path: the model that
    served it, and its outcome when that differs from the status line (a stream cut short, a
    client gone: 499)."""

    __slots__ = ("model", "status")

    def __init__(self) -> None:
        self.model = ""
        self.status: int | None = None


_record: contextvars.ContextVar[ResponseRecord | None] = contextvars.ContextVar("axs_response", default=None)


def record_outcome(model: str, status: int) -> None:
    record = _record.get()
    if record is not None:
        record.model, record.status = model, status


class ResponseMiddleware:
    """What every HTTP response gets, in one layer (a stream's every send passes through it):
    the security headers, and its count in ``axs_requests_total``, once, whatever produced it
    (a route, the auth middleware, the error handlers, an unhandled error). ``endpoint`` is the
    route's path template, so no label value comes from a request's path; paths of no route are
    ``unmatched``."""

    def __init__(self, app: ASGIApp, counter: Counter, routes: list[BaseRoute]) -> None:
        self.app = app
        self.counter = counter
        self.routes = routes
        self._templates: dict[object, str] = {}
        for route in routes:
            endpoint, path = getattr(route, "endpoint", None), getattr(route, "path", None)
            if endpoint is not None and path is not None:
                self._templates.setdefault(endpoint, path)

    def endpoint(self, scope: Scope) -> str:
        known = self._templates.get(scope.get("endpoint"))
        if known is not None:
            return known
        for route in self.routes:  # refused before routing (auth): match it here
            match, child = route.matches(scope)
            if match is not Match.NONE:
                return self._templates.get(child.get("endpoint"), "unmatched")
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = ResponseRecord()
        token = _record.set(record)
        sent: list[int] = []

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent.append(message["status"])
                message["headers"] = [*message.get("headers", []), *_STATIC]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except BaseException:
            if not sent:
                sent.append(500)
            raise
        finally:
            _record.reset(token)
            status = record.status or (sent[0] if sent else 500)
            self.counter.labels(record.model, self.endpoint(scope), str(status)).inc()
