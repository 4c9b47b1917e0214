"""The models routes: list and retrieve (OpenAI's shape, with each model's state, backend,
aliases and pinned flag), and run-time management: load, unload, reload."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from axserving import protocol
from axserving.config import ModelConfig
from axserving.errors import APIError, ServiceUnavailable, UnprocessableRequest
from axserving.generation import client_key
from axserving.routes.inference import read_body
from axserving.state import app_state, json_response


class LoadRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/models``. Types are checked here (400); ranges and names by
    :class:`~axserving.config.ModelConfig` (422)."""

    model_id: str
    path: str
    backend: str | None = None
    context_length: int | None = None
    threads: int | None = None
    max_batch: int | None = None
    batch_size: int | None = None
    kv_unified: bool | None = None
    prefill_slowdown: float | None = None
    prefill_stall_ms: int | None = None
    flash_attn: bool | Literal["auto"] | None = None
    draft_tokens: int | None = None
    pinned: bool = False
    aliases: list[str] = []
    idle_timeout_secs: int | None = None
    memory_bytes: int | str | None = None
    backend_options: dict[str, str] | None = None
    sampling: dict[str, Any] | None = None
    enable_embeddings: bool = False
    pooling: str | None = None


# The request's names for ModelConfig's fields, where they differ (AX Serving's and OpenAI's).
_RENAMED = {"model_id": "id", "context_length": "ctx_size"}
_BACK = {v: k for k, v in _RENAMED.items()}


def to_config(req: LoadRequest) -> ModelConfig:
    raw = {_RENAMED.get(k, k): v for k, v in msgspec.structs.asdict(req).items() if v is not None}
    try:
        return msgspec.convert(raw, ModelConfig)
    except msgspec.ValidationError as e:
        text, _, where = str(e).rpartition(" - at `$.")
        field = where.rstrip("`") if text else None
        if field:
            head, _, rest = field.partition(".")
            field = _BACK.get(head, head) + (f".{rest}" if rest else "")
        raise UnprocessableRequest(
            f"Invalid model: {text or e}" + (f" (at '{field}')" if field else ""), param=field
        ) from e


async def list_models(request: Request) -> Response:
    state = app_state(request)
    return json_response({"object": "list", "data": [m.describe(private=True) for m in state.models]})


async def retrieve_model(request: Request) -> Response:
    model = app_state(request).models.find(request.path_params["model_id"])
    return json_response(model.describe(private=True))


@contextlib.asynccontextmanager
async def audited(request: Request, action: str, target: str) -> AsyncIterator[None]:
    """Record the change in the audit trail with its caller and outcome, however it ends."""
    audit, actor = app_state(request).audit, client_key(request)
    try:
        yield
    except APIError as e:
        audit.record(action, actor, target, f"{e.status} {e.code or e.type}", e.message)
        raise
    except BaseException as e:
        audit.record(action, actor, target, "failed", type(e).__name__)
        raise
    audit.record(action, actor, target, "ok")


async def load_model(request: Request) -> Response:
    state = app_state(request)
    if state.shutting_down:
        raise ServiceUnavailable("the server is shutting down")
    req = protocol.parse(await read_body(request, state.settings.rest), LoadRequest)
    async with audited(request, "model.load", req.model_id):
        model = await state.models.load(to_config(req))
    return json_response(model.describe(private=True), status=201)


async def unload_model(request: Request) -> Response:
    state = app_state(request)
    model_id = request.path_params["model_id"]
    async with audited(request, "model.unload", model_id):
        body = await state.models.unload(model_id)
    return json_response(body)


async def reload_model(request: Request) -> Response:
    state = app_state(request)
    if state.shutting_down:
        raise ServiceUnavailable("the server is shutting down")
    model_id = request.path_params["model_id"]
    async with audited(request, "model.reload", model_id):
        model = await state.models.reload(model_id)
    return json_response(model.describe(private=True))
