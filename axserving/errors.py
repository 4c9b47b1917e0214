"""One error tree for everything the API can answer with; rendered to HTTP in one place.

Each class carries its HTTP status and OpenAI error ``type``; instances carry the message, the
offending ``param`` and a machine-readable ``code``. :func:`error_body` is the only renderer.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson

from ipc.records import FailCode


class APIError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None
    default_headers: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = {**self.default_headers, **(headers or {})}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class UnprocessableRequest(InvalidRequest):
    """Well-formed but semantically out of range (the reference answers 422 for these)."""

    status = 422


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"


class BodyTimeout(InvalidRequest):
    status = 408
    default_code = "body_timeout"


class PayloadTooLarge(InvalidRequest):
    status = 413
    default_code = "request_too_large"


class AuthenticationFailed(APIError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"

    def __init__(self, message: str, **kw: Any) -> None:
        kw.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(message, **kw)


class Forbidden(APIError):
    status = 403
    type = "permission_error"
    default_code = "forbidden"


class Conflict(InvalidRequest):
    status = 409
    default_code = "conflict"


class InsufficientMemory(APIError):
    """The model cannot fit in the memory budget, even with every evictable model unloaded."""

    status = 507
    type = "server_error"
    default_code = "insufficient_memory"


class NotFound(APIError):
    status = 404
    type = "not_found_error"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class MethodNotAllowed(APIError):
    status = 405
    type = "invalid_request_error"


class RateLimited(APIError):
    status = 429
    type = "rate_limit_error"
    default_headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class ServiceUnavailable(APIError):
    """Every 503 says when to come back."""

    status = 503
    type = "server_error"
    default_headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class EngineUnavailable(ServiceUnavailable):
    """The model's engine died, is restarting or has failed; retrying later may succeed."""

    type = "engine_unavailable"
    default_code = "engine_unavailable"


class ClientClosed(APIError):
    """The request was cancelled (its client left); nobody is there to read this."""

    status = 499
    type = "cancelled"
    default_code = "cancelled"


class RequestTimeout(APIError):
    status = 504
    type = "server_error"
    default_code = "timeout"


class EngineError(APIError):
    status = 500
    type = "server_error"
    default_code = "engine_error"


# Anthropic's Messages API has its own error shape; its routes answer in it (auth failures too).
ANTHROPIC_PATHS = ("/v1/messages", "/messages")
_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
}


def anthropic_body(err: APIError) -> dict[str, Any]:
    kind = _ANTHROPIC_TYPES.get(err.status) or ("invalid_request_error" if err.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def body_for(path: str, err: APIError) -> dict[str, Any]:
    """The error object in the shape of the API ``path`` belongs to."""
    if path.startswith(ANTHROPIC_PATHS):
        return anthropic_body(err)
    return err.body()


def error_body(err: APIError, path: str = "") -> bytes:
    return orjson.dumps(body_for(path, err))


def from_engine_failure(code: FailCode, message: str, param: str | None = None) -> APIError:
    """Map an engine's per-request failure (``ipc.records.Failed``) to the tree."""
    return _ENGINE_FAILURES[code](message, param=param, code=code.value)


_ENGINE_FAILURES: dict[FailCode, type[APIError]] = {
    FailCode.invalid_request: InvalidRequest,
    FailCode.context_length_exceeded: ContextLengthExceeded,
    FailCode.cancelled: ClientClosed,
    FailCode.engine_error: EngineError,
}
