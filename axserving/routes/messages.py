"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API (see
:mod:`axserving.anthropic`), served by :class:`~axserving.generation.InferenceResponse` as chat
completions are."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from axserving import anthropic, protocol
from axserving.errors import ServiceUnavailable
from axserving.generation import InferenceResponse, Job, client_key
from axserving.routes.inference import read_body
from axserving.scheduler import Priority
from axserving.state import app_state
from ipc.records import Kind, SamplingParams, Submit


async def messages(request: Request) -> Response:
    state = app_state(request)
    if state.shutting_down:
        raise ServiceUnavailable("the server is shutting down")
    req = protocol.parse(await read_body(request, state.settings.rest), anthropic.MessagesRequest)
    if req.model is not None:
        protocol.check_model_id(req.model)
    chat = anthropic.messages(req)
    gen = anthropic.generation(req)

    def build(rid: int, params: SamplingParams) -> Submit:
        return Submit(rid=rid, params=params, messages=chat, gen=gen)

    job = Job(
        endpoint="messages",
        model=req.model,
        sampling=anthropic.sampling(req),
        shape=anthropic.MessageShape,
        include_usage=True,
        stream=req.stream,
        build=build,
        gen=gen,
        priority=Priority.parse(request.headers.get("x-priority"), param="X-Priority"),
        client=client_key(request),
    )
    return InferenceResponse(state, job)


async def count_tokens(request: Request) -> Response:
    state = app_state(request)
    req = protocol.parse(await read_body(request, state.settings.rest), anthropic.CountTokensRequest)
    if req.model is not None:
        protocol.check_model_id(req.model)
    chat = anthropic.messages(req)
    gen = anthropic.generation(req)

    def build(rid: int, params: SamplingParams) -> Submit:
        return Submit(rid=rid, params=params, messages=chat, gen=gen, kind=Kind.tokenize)

    job = Job(endpoint="count_tokens", model=req.model, sampling=protocol.RequestSampling.unset(),
              shape=anthropic.CountShape, include_usage=False, stream=False, build=build, client=client_key(request))
    return InferenceResponse(state, job)
