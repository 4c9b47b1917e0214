"""``GET /openapi.json``: the API described from the same msgspec types the routes parse with.

Request bodies are the route's own request types (``msgspec.json.schema_components``), so the
document cannot drift from what is validated; every operation lists its error responses in its
API's error shape (OpenAI's, or Anthropic's on ``/v1/messages``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

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


# ---- response bodies, as the shapes in axserving.responses & co. build them; the fuzz tests check
# every JSON answer against these (schemathesis' response conformance), so they cannot drift.


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class FunctionCallOut(msgspec.Struct):
    name: str
    arguments: str


class ToolCallOut(msgspec.Struct):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(msgspec.Struct):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length", "tool_calls"] | None


class ChatCompletion(msgspec.Struct):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length"] | None


class Completion(msgspec.Struct):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class Embedding(msgspec.Struct):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # str: base64 of the float32 array


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelObject(msgspec.Struct):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    state: str
    backend: str
    aliases: list[str]
    pinned: bool
    capabilities: list[Literal["generation", "embeddings"]]


class ModelList(msgspec.Struct):
    object: Literal["list"]
    data: list[ModelObject]


class TokenPiece(msgspec.Struct):
    id: int
    piece: str | list[int]


class Tokens(msgspec.Struct):
    tokens: list[int | TokenPiece]  # ids, or with_pieces: {id, piece}


class Text(msgspec.Struct):
    content: str


class Prompt(msgspec.Struct):
    prompt: str


class ResponseUsage(msgspec.Struct):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class ResponseObject(msgspec.Struct):
    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    model: str
    output: list[dict[str, Any]]
    usage: ResponseUsage | None
    tools: list[dict[str, Any]]
    tool_choice: Any
    parallel_tool_calls: bool


class MessageUsage(msgspec.Struct):
    input_tokens: int
    output_tokens: int


class MessageObject(msgspec.Struct):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None
    usage: MessageUsage


class InputTokens(msgspec.Struct):
    input_tokens: int


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    body: type | None = None
    answer: type | None = None  # the JSON body of a 200 (None: not described beyond "an object")
    errors: tuple[int, ...] = (400, 401, 404, 422, 429, 503)
    public: bool = False
    stream: bool = False  # answers text/event-stream when the body says "stream": true


OPERATIONS = (
    Operation("post", "/v1/chat/completions", "Chat completion (OpenAI)", protocol.ChatCompletionRequest,
              ChatCompletion, stream=True),
    Operation("post", "/v1/completions", "Text completion (OpenAI)", protocol.CompletionRequest, Completion,
              stream=True),
    Operation("post", "/v1/responses", "Response (OpenAI Responses API, stateless)", responses_api.ResponsesRequest,
              ResponseObject, stream=True),
    Operation("post", "/v1/messages", "Message (Anthropic Messages API)", anthropic.MessagesRequest, MessageObject,
              stream=True),
    Operation("post", "/v1/messages/count_tokens", "Count a message's input tokens", anthropic.CountTokensRequest,
              InputTokens),
    Operation("post", "/v1/embeddings", "Embeddings (a model loaded for embeddings)", protocol.EmbeddingsRequest,
              EmbeddingList),
    Operation("post", "/tokenize", "Tokenize text or a chat's prompt", protocol.TokenizeRequest, Tokens),
    Operation("post", "/detokenize", "Token ids back to text", protocol.DetokenizeRequest, Text),
    Operation("post", "/apply-template", "The chat template applied, without generating", protocol.ApplyTemplateRequest,
              Prompt),
    Operation("get", "/v1/models", "The models and their states", answer=ModelList, errors=(401,)),
    Operation("post", "/v1/models", "Load a model at run time", LoadRequest, ModelObject,
              errors=(400, 401, 403, 409, 422, 503, 507)),
    Operation("get", "/v1/models/{model_id}", "One model", answer=ModelObject, errors=(401, 404)),
    Operation("delete", "/v1/models/{model_id}", "Unload a model", errors=(401, 404, 409)),
    Operation("post", "/v1/models/{model_id}/reload", "Reload a model without downtime", answer=ModelObject,
              errors=(401, 404, 409, 503)),
    Operation("get", "/v1/admin/status", "Private details: engines, scheduler, memory", errors=(401,)),
    Operation("get", "/v1/admin/audit", "The audit trail: model changes and refused callers (?limit=N)",
              errors=(400, 401)),
    Operation("get", "/v1/admin/startup-report", "Effective settings and where each came from (secrets masked)",
              errors=(401,)),
    Operation("get", "/v1/admin/diagnostics", "Health, metrics, models, engines and the audit tail in one",
              errors=(401,)),
    Operation("get", "/v1/admin/policy", "Authentication, admission and lifecycle policies in force", errors=(401,)),
    Operation("get", "/v1/metrics", "The metrics as JSON, with p50/p95/p99 over the last minutes (public)",
              errors=(), public=True),
    Operation("get", "/v1/license", "The edition (open source; public)", errors=(), public=True),
    Operation("post", "/v1/license", "Activate a license key (this edition needs none: 400)", errors=(400, 401)),
    Operation("get", "/dashboard", "The live dashboard, an HTML page (public)", errors=(), public=True),
    Operation("get", "/health", "Health (public)", errors=(), public=True),
    Operation("get", "/readyz", "Ready to serve (public)", errors=(503,), public=True),
    Operation("get", "/livez", "Alive (public)", errors=(), public=True),
    Operation("get", "/metrics", "Prometheus metrics (public)", errors=(), public=True),
    Operation("get", "/openapi.json", "This document (public)", errors=(), public=True),
)

_REF = "#/components/schemas/{name}"


@cache
def document() -> dict[str, Any]:
    types = list(dict.fromkeys(
        [t for op in OPERATIONS for t in (op.body, op.answer) if t is not None] + [ErrorBody, AnthropicErrorBody]))
    refs, components = msgspec.json.schema_components(types, ref_template=_REF)
    by_type = dict(zip(types, refs, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        error = by_type[AnthropicErrorBody if op.path.startswith("/v1/messages") else ErrorBody]
        answer = by_type[op.answer] if op.answer is not None else {"type": "object"}
        ok: dict[str, Any] = {"description": "OK", "content": {"application/json": {"schema": answer}}}
        if op.stream:
            ok["content"]["text/event-stream"] = {"schema": {}}  # events: chunks of the JSON above
        if op.path == "/metrics":
            ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
        if op.path == "/dashboard":
            ok["content"] = {"text/html": {"schema": {"type": "string"}}}
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
