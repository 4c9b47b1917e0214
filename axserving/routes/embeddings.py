"""POST /v1/embeddings: pooled, L2-normalized vectors from a model loaded for embeddings
(``enable_embeddings``), batched through its engine; the same admission, auth and metrics as
generation."""

from __future__ import annotations

import functools

from starlette.requests import Request
from starlette.responses import Response

from axserving import protocol
from axserving.responses import EmbeddingShape
from axserving.routes.inference import parsed, respond
from ipc.records import Generation, Kind, SamplingParams, Submit


async def embeddings(request: Request) -> Response:
    req = await parsed(request, protocol.EmbeddingsRequest)
    texts, ids = protocol.embedding_inputs(req)
    gen = Generation(n=len(texts) or len(ids))  # one "choice" per input

    def build(rid: int, params: SamplingParams) -> Submit:
        return Submit(rid=rid, params=params, gen=gen, kind=Kind.embed, inputs=texts, inputs_ids=ids)

    shape = functools.partial(EmbeddingShape, base64=req.encoding_format == "base64")
    return respond(request, endpoint="embeddings", model=req.model, shape=shape, build=build, gen=gen,
                   embeddings=True)
