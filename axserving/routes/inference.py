"""POST /v1/chat/completions and POST /v1/completions.

The two differ only in how the body becomes an engine ``Submit`` and in their output shape;
everything after that is :class:`axserving.generation.InferenceResponse`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from axserving import protocol
from axserving.config import RestSettings
from axserving.errors import BodyTimeout, PayloadTooLarge, ServiceUnavailable
from axserving.generation import InferenceResponse, Job, client_key
from axserving.responses import ChatShape, CompletionShape, Shape
from axserving.scheduler import Priority
from axserving.state import app_state
from ipc.records import Generation, SamplingParams, Submit


async def read_body(request: Request, rest: RestSettings) -> bytes:
    """The body, refusing (413) past ``max_body_bytes`` without reading the rest into memory,
    and (408) if it is not all there within ``body_timeout_secs``."""
    limit = rest.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(rest.body_timeout_secs):
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
                parts.append(part)
    except TimeoutError:
        raise BodyTimeout(
            f"the request body was not complete within {rest.body_timeout_secs:g}s ({size} bytes came)"
        ) from None
    return b"".join(parts)


Build = Callable[[int, SamplingParams], Submit]


def _chat_submit(req: protocol.ChatCompletionRequest, gen: Generation) -> Build:
    messages = protocol.chat_messages(req)
    return lambda rid, params: Submit(rid=rid, params=params, messages=messages, gen=gen)


def _completion_submit(req: protocol.CompletionRequest, gen: Generation) -> Build:
    prompt = protocol.completion_prompt(req)
    if isinstance(prompt, str):
        return lambda rid, params: Submit(rid=rid, params=params, prompt=prompt, gen=gen)
    ids = prompt.tobytes()
    return lambda rid, params: Submit(rid=rid, params=params, prompt_ids=ids, gen=gen)


S = TypeVar("S", bound=msgspec.Struct)


async def parsed(request: Request, kind: type[S]) -> S:
    """The request's body as ``kind`` (400 naming the field), its ``model`` checked; 503 while
    the server shuts down. Every model-serving route starts here."""
    state = app_state(request)
    if state.shutting_down:
        raise ServiceUnavailable("the server is shutting down")
    req = protocol.parse(await read_body(request, state.settings.rest), kind)
    model = getattr(req, "model", None)
    if model is not None:
        protocol.check_model_id(model)
    return req


def respond(
    request: Request,
    *,
    endpoint: str,
    model: str | None,
    shape: Callable[..., Shape],
    build: Build,
    sampling: protocol.RequestSampling | None = None,
    gen: Generation | None = None,
    stream: bool = False,
    include_usage: bool = False,
    embeddings: bool = False,
    priority: str | None = None,
) -> InferenceResponse:
    """The response that runs the request (admission, engine, streaming, metrics): one place for
    every route that serves a model."""
    if priority is not None:
        rank = Priority.parse(priority)
    else:
        rank = Priority.parse(request.headers.get("x-priority"), param="X-Priority")
    job = Job(
        endpoint=endpoint,
        model=model,
        sampling=sampling or protocol.RequestSampling.unset(),
        shape=shape,
        include_usage=include_usage,
        stream=stream,
        build=build,
        gen=gen or Generation(),
        embeddings=embeddings,
        priority=rank,
        client=client_key(request),
    )
    return InferenceResponse(app_state(request), job)


async def _serve(
    request: Request,
    endpoint: str,
    kind: type[protocol.R],
    shape: type[ChatShape | CompletionShape],
    submit: Callable[[protocol.R, Generation], Build],
) -> Response:
    req = await parsed(request, kind)
    gen = protocol.generation(req)
    return respond(
        request, endpoint=endpoint, model=req.model, shape=shape, build=submit(req, gen),
        sampling=protocol.sampling_params(req), gen=gen, stream=req.stream,
        include_usage=protocol.include_usage(req), priority=req.priority,
    )


async def chat_completions(request: Request) -> Response:
    return await _serve(request, "chat", protocol.ChatCompletionRequest, ChatShape, _chat_submit)


async def completions(request: Request) -> Response:
    return await _serve(request, "completions", protocol.CompletionRequest, CompletionShape, _completion_submit)
