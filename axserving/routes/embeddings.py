"""POST /v1/embeddings: pooled, L2-normalized vectors from a model loaded for embeddings
(``enable_embeddings``), batched through its engine; the same admission, auth and metrics as
generation."""

from __future__ import annotations

import functools

from starlette.requests import Request
from starlette.responses import Response

from axserving import protocol
from axserving.errors import ServiceUnavailable
from axserving.generation import InferenceResponse, Job, client_key
from axserving.responses import EmbeddingShape
from axserving.routes.inference import read_body
from axserving.state import app_state
from ipc.records import Generation, Kind, SamplingParams, Submit


async def embeddings(request: Request) -> Response:
    state = app_state(request)
    if state.shutting_down:
        raise ServiceUnavailable("the server is shutting down")
    req = protocol.parse(await read_body(request, state.settings.rest), protocol.EmbeddingsRequest)
    if req.model is not None:
        protocol.check_model_id(req.model)
    texts, ids = protocol.embedding_inputs(req)
    gen = Generation(n=len(texts) or len(ids))  # one "choice" per input

    def build(rid: int, params: SamplingParams) -> Submit:
        return Submit(rid=rid, params=params, gen=gen, kind=Kind.embed, inputs=texts, inputs_ids=ids)

    job = Job(
        endpoint="embeddings", model=req.model, sampling=protocol.RequestSampling.unset(),
        shape=functools.partial(EmbeddingShape, base64=req.encoding_format == "base64"),
        include_usage=False, stream=False, build=build, gen=gen, embeddings=True, client=client_key(request),
    )
    return InferenceResponse(state, job)
