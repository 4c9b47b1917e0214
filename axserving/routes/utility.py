"""POST /tokenize, /detokenize and /apply-template (llama-server's shapes), per model.

They are answered by the model's engine from its vocabulary and chat template (``Submit.kind``)
without running the model, and go through the same admission, auth, metrics and error handling
as generation (:class:`~axserving.generation.InferenceResponse`).
"""

from __future__ import annotations

import array
import functools
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from axserving import protocol
from axserving.errors import InvalidRequest, ServiceUnavailable
from axserving.generation import InferenceResponse, Job, client_key
from axserving.protocol import MAX_TOKEN_ID, ChatCompletionRequest
from axserving.responses import DetokenizeShape, Shape, TemplateShape, TokenizeShape
from axserving.routes.inference import read_body
from axserving.state import app_state
from ipc.records import ChatMessage, Generation, Kind, SamplingParams, Submit

Build = Callable[[int, SamplingParams], Submit]


def _chat_parts(
    messages: list[protocol.Message], tools: list[protocol.ToolDef] | None, tool_choice: Any = None
) -> tuple[tuple[ChatMessage, ...], Generation]:
    """Messages and tools as chat completions validates them (the same 400s, the same rendering)."""
    req = ChatCompletionRequest(messages=messages, tools=tools, tool_choice=tool_choice)
    return protocol.chat_messages(req), protocol.generation(req)


async def _respond(
    request: Request, endpoint: str, model: str | None, shape: Callable[..., Shape], build: Build
) -> Response:
    state = app_state(request)
    if state.shutting_down:
        raise ServiceUnavailable("the server is shutting down")
    if model is not None:
        protocol.check_model_id(model)
    job = Job(endpoint=endpoint, model=model, sampling=protocol.RequestSampling.unset(), shape=shape,
              include_usage=False, stream=False, build=build, client=client_key(request))
    return InferenceResponse(state, job)


async def tokenize(request: Request) -> Response:
    state = app_state(request)
    req = protocol.parse(await read_body(request, state.settings.rest), protocol.TokenizeRequest)
    if (req.content is None) == (req.messages is None):
        raise InvalidRequest("give exactly one of 'content' and 'messages'", param="content")
    if req.messages is not None:
        messages, gen = _chat_parts(req.messages, req.tools)

        def build(rid: int, params: SamplingParams) -> Submit:
            return Submit(rid=rid, params=params, messages=messages, gen=gen, kind=Kind.tokenize,
                          with_pieces=req.with_pieces)
    else:
        content = req.content

        def build(rid: int, params: SamplingParams) -> Submit:
            return Submit(rid=rid, params=params, prompt=content, kind=Kind.tokenize,
                          add_special=req.add_special, with_pieces=req.with_pieces)
    shape = functools.partial(TokenizeShape, with_pieces=req.with_pieces)
    return await _respond(request, "tokenize", req.model, shape, build)


async def detokenize(request: Request) -> Response:
    state = app_state(request)
    req = protocol.parse(await read_body(request, state.settings.rest), protocol.DetokenizeRequest)
    if not all(0 <= t <= MAX_TOKEN_ID for t in req.tokens):
        raise InvalidRequest("'tokens' must be token ids", param="tokens")
    ids = array.array("i", req.tokens).tobytes()

    def build(rid: int, params: SamplingParams) -> Submit:
        return Submit(rid=rid, params=params, prompt_ids=ids, kind=Kind.detokenize)

    return await _respond(request, "detokenize", req.model, DetokenizeShape, build)


async def apply_template(request: Request) -> Response:
    state = app_state(request)
    req = protocol.parse(await read_body(request, state.settings.rest), protocol.ApplyTemplateRequest)
    messages, gen = _chat_parts(req.messages, req.tools, req.tool_choice)

    def build(rid: int, params: SamplingParams) -> Submit:
        return Submit(rid=rid, params=params, messages=messages, gen=gen, kind=Kind.template)

    return await _respond(request, "apply_template", req.model, TemplateShape, build)

