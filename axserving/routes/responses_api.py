"""POST /v1/responses: OpenAI's Responses API (see :mod:`axserving.responses_api`), served by
:class:`~axserving.generation.InferenceResponse` as chat completions are."""

from __future__ import annotations

import functools

from starlette.requests import Request
from starlette.responses import Response

from axserving import protocol, responses_api
from axserving.errors import ServiceUnavailable
from axserving.generation import InferenceResponse, Job, client_key
from axserving.routes.inference import read_body
from axserving.scheduler import Priority
from axserving.state import app_state
from ipc.records import SamplingParams, Submit


async def create_response(request: Request) -> Response:
    state = app_state(request)
    if state.shutting_down:
        raise ServiceUnavailable("the server is shutting down")
    req = protocol.parse(await read_body(request, state.settings.rest), responses_api.ResponsesRequest)
    if req.model is not None:
        protocol.check_model_id(req.model)
    messages, sampling, gen = responses_api.translated(req)

    def build(rid: int, params: SamplingParams) -> Submit:
        return Submit(rid=rid, params=params, messages=messages, gen=gen)

    job = Job(
        endpoint="responses",
        model=req.model,
        sampling=sampling,
        shape=functools.partial(responses_api.ResponseShape, request=req),
        include_usage=True,
        stream=req.stream,
        build=build,
        gen=gen,
        priority=Priority.parse(request.headers.get("x-priority"), param="X-Priority"),
        client=client_key(request),
    )
    return InferenceResponse(state, job)
