"""``GET /openapi.json``: the API described from the same msgspec types the routes parse with.

Request bodies are the route's own request types (``msgspec.json.schema_components``), so the
document cannot drift from what is validated; every operation lists its error responses in its
API's error shape (OpenAI's, or Anthropic's on ``/v1/messages``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import msgspec

from axserving import __version__, anthropic, protocol, responses_api
from axserving.routes.models import LoadRequest


class ErrorObject(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct):
    """OpenAI's error shape (every route but Anthropic's)."""

    error: ErrorObject


class AnthropicErrorObject(msgspec.Struct):
    type: str
    message: str


class AnthropicErrorBody(msgspec.Struct):
    type: str
    error: AnthropicErrorObject


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    body: type | None = None
    errors: tuple[int, ...] = (400, 401, 404, 422, 429, 503)
    public: bool = False
    stream: bool = False  # answers text/event-stream when the body says "stream": true


OPERATIONS = (
    Operation("post", "/v1/chat/completions", "Chat completion (OpenAI)", protocol.ChatCompletionRequest, stream=True),
    Operation("post", "/v1/completions", "Text completion (OpenAI)", protocol.CompletionRequest, stream=True),
    Operation("post", "/v1/responses", "Response (OpenAI Responses API, stateless)", responses_api.ResponsesRequest,
              stream=True),
    Operation("post", "/v1/messages", "Message (Anthropic Messages API)", anthropic.MessagesRequest, stream=True),
    Operation("post", "/v1/messages/count_tokens", "Count a message's input tokens", anthropic.CountTokensRequest),
    Operation("post", "/v1/embeddings", "Embeddings (a model loaded for embeddings)", protocol.EmbeddingsRequest),
    Operation("post", "/tokenize", "Tokenize text or a chat's prompt", protocol.TokenizeRequest),
    Operation("post", "/detokenize", "Token ids back to text", protocol.DetokenizeRequest),
    Operation("post", "/apply-template", "The chat template applied, without generating", protocol.ApplyTemplateRequest),
    Operation("get", "/v1/models", "The models and their states", errors=(401,)),
    Operation("post", "/v1/models", "Load a model at run time", LoadRequest, errors=(400, 401, 403, 409, 422, 503, 507)),
    Operation("get", "/v1/models/{model_id}", "One model", errors=(401, 404)),
    Operation("delete", "/v1/models/{model_id}", "Unload a model", errors=(401, 404, 409)),
    Operation("post", "/v1/models/{model_id}/reload", "Reload a model without downtime", errors=(401, 404, 409, 503)),
    Operation("get", "/v1/admin/status", "Private details: engines, scheduler, memory", errors=(401,)),
    Operation("get", "/health", "Health (public)", errors=(), public=True),
    Operation("get", "/readyz", "Ready to serve (public)", errors=(503,), public=True),
    Operation("get", "/livez", "Alive (public)", errors=(), public=True),
    Operation("get", "/metrics", "Prometheus metrics (public)", errors=(), public=True),
    Operation("get", "/openapi.json", "This document (public)", errors=(), public=True),
)

_REF = "#/components/schemas/{name}"


@cache
def document() -> dict[str, Any]:
    bodies = [op.body for op in OPERATIONS if op.body is not None]
    refs, components = msgspec.json.schema_components([*bodies, ErrorBody, AnthropicErrorBody], ref_template=_REF)
    by_type = dict(zip([*bodies, ErrorBody, AnthropicErrorBody], refs, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        error = by_type[AnthropicErrorBody if op.path.startswith("/v1/messages") else ErrorBody]
        ok: dict[str, Any] = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
        if op.stream:
            ok["content"]["text/event-stream"] = {"schema": {"type": "string"}}
        if op.path == "/metrics":
            ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
        spec: dict[str, Any] = {
            "summary": op.summary,
            "operationId": f"{op.method}_{op.path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
            "responses": {"200": ok, **{str(code): {"description": "error", "content": {
                "application/json": {"schema": error}}} for code in op.errors}},
        }
        if op.path == "/v1/models" and op.method == "post":
            spec["responses"]["201"] = spec["responses"].pop("200")
        if op.body is not None:
            spec["requestBody"] = {"required": True, "content": {"application/json": {"schema": by_type[op.body]}}}
        if "{model_id}" in op.path:
            spec["parameters"] = [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}]
        if not op.public:
            spec["security"] = [{"bearer": []}, {"apiKey": []}]
        paths.setdefault(op.path, {})[op.method] = spec
    return {
        "openapi": "3.1.0",
        "info": {"title": "axserving", "version": __version__,
                 "description": "An offline, OpenAI- and Anthropic-compatible LLM serving plane."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
        },
    }
