"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API (see
:mod:`axserving.anthropic`), served as chat completions are."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from axserving import anthropic, protocol
from axserving.routes.inference import parsed, respond
from ipc.records import Kind, SamplingParams, Submit


async def messages(request: Request) -> Response:
    req = await parsed(request, anthropic.MessagesRequest)
    chat, gen = anthropic.messages(req), anthropic.generation(req)

    def build(rid: int, params: SamplingParams) -> Submit:
        return Submit(rid=rid, params=params, messages=chat, gen=gen)

    return respond(request, endpoint="messages", model=req.model, shape=anthropic.MessageShape, build=build,
                   sampling=anthropic.sampling(req), gen=gen, stream=req.stream)


async def count_tokens(request: Request) -> Response:
    req = await parsed(request, anthropic.CountTokensRequest)
    chat, gen = anthropic.messages(req), anthropic.generation(req)

    def build(rid: int, params: SamplingParams) -> Submit:
        return Submit(rid=rid, params=params, messages=chat, gen=gen, kind=Kind.tokenize)

    return respond(request, endpoint="count_tokens", model=req.model, shape=anthropic.CountShape, build=build,
                   sampling=protocol.RequestSampling.unset())
