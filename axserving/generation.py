"""From a validated request to a finished response: routing, admission, submission, streaming
or collection, cancellation, and the metrics recorded once at the end.

Both inference routes (chat and text completions) answer with :class:`InferenceResponse`; they differ only
in the :class:`~axserving.responses.Shape` of their output and in the ``Submit`` they build.

The whole life of a request runs inside one :class:`InferenceResponse` call, under one context
manager (:func:`request_scope`) that takes the model lease, the scheduler's slot and the gauges,
and gives them back however the response ends: an error before the first byte (rendered by the
app's one error handler), a finished body, a stream cut short, the client leaving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import msgspec
from asgi_correlation_id import correlation_id
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from axserving.engine.stream import Chunk, RequestStream
from axserving.errors import APIError, InvalidRequest
from axserving.middleware import record_outcome
from axserving.models.manager import Lease
from axserving.protocol import RequestSampling
from axserving.responses import Choice, Shape
from axserving.scheduler import Priority, Ticket
from axserving.sse import Event, EventStreamResponse
from axserving.state import AppState, json_response
from ipc.records import Generation, SamplingParams, Submit

log = logging.getLogger("axserving.generation")

CLIENT_CLOSED = 499  # nginx's convention; nobody reads it, but logs and metrics do


class ClientDisconnected(Exception):
    pass


@dataclass
class Job:
    endpoint: str
    model: str | None  # as the request named it (an id or alias), None for the default
    sampling: RequestSampling
    shape: Callable[..., Shape]  # the response's shape (a Shape subclass, or a partial of one)
    include_usage: bool
    stream: bool
    build: Callable[[int, SamplingParams], Submit]
    gen: Generation = field(default_factory=Generation)
    embeddings: bool = False  # needs a model loaded for embeddings (else one for generation)
    priority: Priority = Priority.normal
    client: str = ""  # whose request: for fairness between clients


def client_key(request: Request) -> str:
    """A hash of the bearer key, else the peer address."""
    auth = request.headers.get("authorization", "")
    if auth:
        return hashlib.sha256(auth.encode()).hexdigest()[:16]
    return request.client.host if request.client else ""


class _Outcome:
    """What is recorded once per request, whatever path it ends on."""

    def __init__(self, state: AppState, job: Job, lease: Lease, arrived: float) -> None:
        self.state, self.job, self.lease = state, job, lease
        self.status = 200
        self.finishes: list[str] = []
        self.figures = state.metrics.for_request(lease.model_id, arrived)
        self.stream: RequestStream | None = None
        self.delivered = False  # the whole answer went out (a stream's trailer may not have)

    @property
    def prompt_tokens(self) -> int:
        return self.figures.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self.figures.completion_tokens

    @property
    def cached_tokens(self) -> int:
        return self.figures.cached_tokens

    def submitted(self, stream: RequestStream) -> None:
        self.stream = stream
        self.figures.submitted = stream.created

    def tokens(self, chunk: Chunk) -> None:
        f = self.figures
        f.prompt_tokens = chunk.prompt_tokens or f.prompt_tokens
        f.cached_tokens = chunk.cached_tokens or f.cached_tokens
        f.output(chunk.index, chunk.completion_tokens, time.monotonic())
        if chunk.finish_reason:
            self.finishes.append(chunk.finish_reason)
        stream = self.stream
        if f.first_token_at is None and stream is not None:
            f.first_token_at = stream.first_token_at

    def close(self) -> None:
        state, model, f = self.state, self.lease.model_id, self.figures
        if self.stream is not None:
            self.stream.cancel()  # frees the engine's slot if it is still generating
        self.lease.release()
        state.admitted -= 1
        state.metrics.running.labels(model).dec()
        record_outcome(model, self.status)
        f.finish(self.status, self.finishes)
        ttft = None if f.first_token_at is None else f.first_token_at - f.arrived
        log.info(
            "%s %s %d: prompt %d, completion %d, cached %d tokens, ttft %s ms, %d ms",
            self.job.endpoint, model, self.status, f.prompt_tokens, f.completion_tokens, f.cached_tokens,
            "-" if ttft is None else round(ttft * 1000), round((time.monotonic() - f.arrived) * 1000),
        )


@contextlib.asynccontextmanager
async def request_scope(state: AppState, job: Job) -> AsyncIterator[tuple[_Outcome, Ticket]]:
    """The request's lease on its model, its scheduler slot and its gauges, for the body of
    the ``async with``; released, and the outcome recorded, however it ends."""
    arrived = time.monotonic()
    lease = state.models.acquire(job.model)  # 404 for an unknown model, before anything is counted
    state.admitted += 1
    state.metrics.running.labels(lease.model_id).inc()
    outcome = _Outcome(state, job, lease, arrived)
    try:
        cap = state.scheduler.model_cap(lease.spec.engine.max_batch)
        async with state.scheduler.admit(lease.model_id, cap, job.priority, job.client) as ticket:
            outcome.figures.admitted(ticket.queue_wait)
            yield outcome, ticket
    except APIError as e:
        outcome.status = e.status
        raise
    except (asyncio.CancelledError, ClientDisconnected):
        if not outcome.delivered:
            outcome.status = CLIENT_CLOSED
        raise
    except BaseException:
        outcome.status = 500
        raise
    finally:
        outcome.close()


class _DisconnectWatch:
    """Cancel the task that runs the request if the client disconnects; :meth:`stop` before
    handing ``receive`` to the streaming response, which watches it from then on."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task = asyncio.current_task()
        self.gone = False
        self._watcher: asyncio.Task[None] | None = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        assert self._task is not None
        self._task.cancel()

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None


class InferenceResponse(Response):
    """Runs the request when Starlette sends the response, so that everything it holds is held
    inside one ``async with`` (a streaming body outlives the route function)."""

    def __init__(self, state: AppState, job: Job) -> None:
        self.state, self.job = state, job
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watch = _DisconnectWatch(receive)
        try:
            await self._run(watch, scope, receive, send)
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()  # the client left: an ordinary end (the ASGI server wants a reply)
            await Response(status_code=CLIENT_CLOSED)(scope, receive, send)
        finally:
            watch.stop()

    async def _run(self, watch: _DisconnectWatch, scope: Scope, receive: Receive, send: Send) -> None:
        state, job = self.state, self.job
        sched = state.settings.scheduler
        async with request_scope(state, job) as (outcome, ticket):
            lease = outcome.lease
            if job.embeddings != lease.spec.engine.embeddings:
                what = "embeddings" if lease.spec.engine.embeddings else "generation"
                raise InvalidRequest(
                    f"model '{lease.model_id}' is loaded for {what}; this endpoint needs a model loaded for "
                    f"{'embeddings' if job.embeddings else 'generation'}", param="model", code="wrong_model_kind")
            params = job.sampling.resolve(lease.spec.sampling, sched.default_max_tokens)
            n_ctx = lease.spec.engine.n_ctx
            if job.sampling.max_tokens is not None and job.sampling.max_tokens >= n_ctx:
                raise InvalidRequest(
                    f"'{job.sampling.max_tokens_param}' must be less than the model's context of {n_ctx} tokens, "
                    f"got {job.sampling.max_tokens}",
                    param=job.sampling.max_tokens_param,
                )
            shape = job.shape(
                model=job.model or lease.model_id,
                include_usage=job.include_usage,
                logprobs=job.gen.logprobs >= 0,
                n=job.gen.n,
            )
            # The request's own time starts once it has a slot: max_wait_ms bounded the wait.
            deadline = ticket.started + sched.request_timeout_secs
            ready_by = min(ticket.started + sched.max_wait_ms / 1000, deadline)
            request_id = correlation_id.get() or ""
            stream = await lease.client.submit(
                lambda rid: msgspec.structs.replace(job.build(rid, params), request_id=request_id), ready_by, deadline
            )
            outcome.submitted(stream)
            # Wait for the first output before answering, so an engine-side rejection (a prompt
            # longer than the context, say) is an ordinary HTTP error for streaming requests too.
            first = await stream.next()
            queue_wait_us = int((stream.created - outcome.figures.arrived) * 1e6)
            headers = {"X-Ax-Stage-Timing": f"queue_wait_us={queue_wait_us}"}
            if job.stream:
                watch.stop()
                await EventStreamResponse(_sse(shape, stream, first, outcome), headers=headers)(scope, receive, send)
                return
            choices = await _collect(stream, first, outcome, job.gen.n)
            body = shape.complete(choices, outcome.prompt_tokens, outcome.completion_tokens, outcome.cached_tokens)
            watch.stop()
            await json_response(body, headers=headers)(scope, receive, send)


async def _collect(stream: RequestStream, chunk: Chunk | None, outcome: _Outcome, n: int) -> list[Choice]:
    choices = [Choice(i) for i in range(n)]
    while chunk is not None:
        outcome.tokens(chunk)
        choices[chunk.index].add(chunk)
        chunk = await stream.next()
    return choices


async def _sse(
    shape: Shape, stream: RequestStream, first: Chunk | None, outcome: _Outcome
) -> AsyncIterator[Event]:
    try:
        try:
            for head in shape.first_chunks(first):
                yield head
            chunk = first
            while chunk is not None:
                outcome.tokens(chunk)
                for event in shape.chunks(chunk):
                    yield event
                chunk = await stream.next()
            # The generation is complete: a client that leaves during the trailer (usage,
            # [DONE]), as clients do once they have read [DONE], got its whole answer.
            outcome.delivered = True
            for event in shape.final_events(outcome.prompt_tokens, outcome.completion_tokens, outcome.cached_tokens):
                yield event
        except APIError as e:
            # Mid-stream failure (engine died, timeout): the API's error event(s) end the stream.
            outcome.status = e.status
            log.warning("stream %s ended with %s: %s", shape.id, type(e).__name__, e.message)
            for event in shape.error_events(e):
                yield event
    except BaseException:
        # Cancelled (the client left) or a bug: the request scope frees the engine's slot.
        if outcome.status == 200 and not outcome.delivered:
            outcome.status = CLIENT_CLOSED
        raise
    finally:
        stream.cancel()  # at once, not when the scope ends
