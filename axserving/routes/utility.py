"""POST /tokenize, /detokenize and /apply-template (llama-server's shapes), per model.

They are answered by the model's engine from its vocabulary and chat template (``Submit.kind``)
without running the model, and go through the same admission, auth, metrics and error handling
as generation (:class:`~axserving.generation.InferenceResponse`).
"""

from __future__ import annotations

import array
import functools
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from axserving import protocol
from axserving.errors import InvalidRequest
from axserving.protocol import MAX_TOKEN_ID, ChatCompletionRequest
from axserving.responses import DetokenizeShape, TemplateShape, TokenizeShape
from axserving.routes.inference import parsed, respond
from ipc.records import ChatMessage, Generation, Kind, SamplingParams, Submit


def _chat_parts(
    messages: list[protocol.Message], tools: list[protocol.ToolDef] | None, tool_choice: Any = None
) -> tuple[tuple[ChatMessage, ...], Generation]:
    """Messages and tools as chat completions validates them (the same 400s, the same rendering)."""
    req = ChatCompletionRequest(messages=messages, tools=tools, tool_choice=tool_choice)
    return protocol.chat_messages(req), protocol.generation(req)


async def tokenize(request: Request) -> Response:
    req = await parsed(request, protocol.TokenizeRequest)
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
    return respond(request, endpoint="tokenize", model=req.model, shape=shape, build=build)


async def detokenize(request: Request) -> Response:
    req = await parsed(request, protocol.DetokenizeRequest)
    if not all(0 <= t <= MAX_TOKEN_ID for t in req.tokens):
        raise InvalidRequest("'tokens' must be token ids", param="tokens")
    ids = array.array("i", req.tokens).tobytes()

    def build(rid: int, params: SamplingParams) -> Submit:
        return Submit(rid=rid, params=params, prompt_ids=ids, kind=Kind.detokenize)

    return respond(request, endpoint="detokenize", model=req.model, shape=DetokenizeShape, build=build)


async def apply_template(request: Request) -> Response:
    req = await parsed(request, protocol.ApplyTemplateRequest)
    messages, gen = _chat_parts(req.messages, req.tools, req.tool_choice)

    def build(rid: int, params: SamplingParams) -> Submit:
        return Submit(rid=rid, params=params, messages=messages, gen=gen, kind=Kind.template)

    return respond(request, endpoint="apply_template", model=req.model, shape=TemplateShape, build=build)

