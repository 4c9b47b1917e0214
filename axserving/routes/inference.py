"""POST /v1/chat/completions and POST /v1/completions."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from axserving import protocol
from axserving.errors import ServiceUnavailable
from axserving.generation import Job, generate
from axserving.responses import ChatShape, CompletionShape
from axserving.state import app_state
from ipc.records import Submit


async def _body(request: Request) -> bytes:
    if app_state(request).shutting_down:
        raise ServiceUnavailable("the server is shutting down")
    return await request.body()


async def chat_completions(request: Request) -> Response:
    state = app_state(request)
    req = protocol.parse(await _body(request), protocol.ChatCompletionRequest)
    params = protocol.sampling_params(req, state.settings.scheduler.default_max_tokens)
    messages = protocol.chat_messages(req)
    entry = state.registry.get(req.model)
    job = Job(
        endpoint="chat",
        entry=entry,
        shape=ChatShape(model=req.model, include_usage=protocol.include_usage(req)),
        stream=req.stream,
        build=lambda rid: Submit(rid=rid, params=params, messages=messages),
    )
    return await generate(request, state, job)


async def completions(request: Request) -> Response:
    state = app_state(request)
    req = protocol.parse(await _body(request), protocol.CompletionRequest)
    params = protocol.sampling_params(req, state.settings.scheduler.default_max_tokens)
    prompt = protocol.completion_prompt(req)
    entry = state.registry.get(req.model)
    job = Job(
        endpoint="completions",
        entry=entry,
        shape=CompletionShape(model=req.model, include_usage=protocol.include_usage(req)),
        stream=req.stream,
        build=lambda rid: Submit(rid=rid, params=params, prompt=prompt),
    )
    return await generate(request, state, job)
