"""POST /v1/chat/completions and POST /v1/completions.

The two differ only in how the body becomes an engine ``Submit`` and in their output shape;
everything after that is :class:`axserving.generation.InferenceResponse`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response

from axserving import protocol
from axserving.config import RestSettings
from axserving.errors import BodyTimeout, PayloadTooLarge, ServiceUnavailable
from axserving.generation import InferenceResponse, Job, client_key
from axserving.responses import ChatShape, CompletionShape
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


async def _serve(
    request: Request,
    endpoint: str,
    kind: type[protocol.R],
    shape: type[ChatShape | CompletionShape],
    submit: Callable[[protocol.R, Generation], Build],
) -> Response:
    state = app_state(request)
    if state.shutting_down:
        raise ServiceUnavailable("the server is shutting down")
    req = protocol.parse(await read_body(request, state.settings.rest), kind)
    if req.priority is not None:
        priority = Priority.parse(req.priority)
    else:
        priority = Priority.parse(request.headers.get("x-priority"), param="X-Priority")
    sampling = protocol.sampling_params(req)
    gen = protocol.generation(req)
    job = Job(
        endpoint=endpoint,
        model=req.model,
        sampling=sampling,
        shape=shape,
        include_usage=protocol.include_usage(req),
        stream=req.stream,
        build=submit(req, gen),
        gen=gen,
        priority=priority,
        client=client_key(request),
    )
    return InferenceResponse(state, job)


async def chat_completions(request: Request) -> Response:
    return await _serve(request, "chat", protocol.ChatCompletionRequest, ChatShape, _chat_submit)


async def completions(request: Request) -> Response:
    return await _serve(request, "completions", protocol.CompletionRequest, CompletionShape, _completion_submit)
