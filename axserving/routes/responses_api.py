"""POST /v1/responses: OpenAI's Responses API (see :mod:`axserving.responses_api`), served as
chat completions are."""

from __future__ import annotations

import functools

from starlette.requests import Request
from starlette.responses import Response

from axserving import responses_api
from axserving.routes.inference import parsed, respond
from ipc.records import SamplingParams, Submit


async def create_response(request: Request) -> Response:
    req = await parsed(request, responses_api.ResponsesRequest)
    messages, sampling, gen = responses_api.translated(req)

    def build(rid: int, params: SamplingParams) -> Submit:
        return Submit(rid=rid, params=params, messages=messages, gen=gen)

    shape = functools.partial(responses_api.ResponseShape, request=req)
    return respond(request, endpoint="responses", model=req.model, shape=shape, build=build, sampling=sampling,
                   gen=gen, stream=req.stream)
