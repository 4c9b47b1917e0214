"""From a validated request to a finished response: admission, submission, streaming or
collection, cancellation, and the metrics recorded once at the end.

Both inference routes (chat and text completions) go through :func:`generate`; they differ only
in the :class:`~axserving.responses.Shape` of their output and in the ``Submit`` they build.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import Response

from axserving.engine.stream import Chunk, RequestStream
from axserving.errors import APIError, RateLimited
from axserving.models.manager import Lease
from axserving.protocol import RequestSampling
from axserving.responses import ChatShape, CompletionShape
from axserving.sse import EventStreamResponse
from axserving.state import AppState, json_response
from ipc.records import SamplingParams, Submit

log = logging.getLogger("axserving.generation")
T = TypeVar("T")

CLIENT_CLOSED = 499  # nginx's convention; nobody reads it, but logs and metrics do


class ClientDisconnected(Exception):
    pass


@dataclass
class Job:
    endpoint: str
    model: str | None  # as the request named it (an id or alias), None for the default
    sampling: RequestSampling
    shape: type[ChatShape | CompletionShape]
    include_usage: bool
    stream: bool
    build: Callable[[int, SamplingParams], Submit]


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run ``work`` unless the client disconnects first (then cancel it and raise)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


class _Outcome:
    """What is recorded once per request, whatever path it ends on."""

    def __init__(self, state: AppState, job: Job, lease: Lease, arrived: float) -> None:
        self.state, self.job, self.lease, self.arrived = state, job, lease, arrived
        self.status = 200
        self.finish: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.ttft: float | None = None
        self._done = False

    def tokens(self, chunk: Chunk, stream: RequestStream) -> None:
        self.prompt_tokens = chunk.prompt_tokens or self.prompt_tokens
        self.completion_tokens = chunk.completion_tokens
        self.cached_tokens = chunk.cached_tokens or self.cached_tokens
        if chunk.finish_reason:
            self.finish = chunk.finish_reason
        if self.ttft is None and stream.first_token_at is not None:
            self.ttft = stream.first_token_at - self.arrived

    def close(self) -> None:
        if self._done:
            return
        self._done = True
        state, model = self.state, self.lease.model_id
        m = state.metrics
        self.lease.release()
        state.admitted -= 1
        m.running.labels(model).dec()
        m.requests.labels(model, self.job.endpoint, str(self.status)).inc()
        m.e2e.labels(model).observe(time.monotonic() - self.arrived)
        if self.ttft is not None:
            m.ttft.labels(model).observe(self.ttft)
        m.prompt_tokens.labels(model).inc(self.prompt_tokens)
        m.cached_prompt_tokens.labels(model).inc(self.cached_tokens)
        m.generation_tokens.labels(model).inc(self.completion_tokens)
        if self.finish:
            m.finish.labels(model, self.finish).inc()


async def generate(request: Request, state: AppState, job: Job) -> Response:
    sched = state.settings.scheduler
    arrived = time.monotonic()
    lease = state.models.acquire(job.model)  # 404 for an unknown model, before anything is counted
    if state.admitted >= sched.max_inflight + sched.max_queue:
        lease.release()
        state.metrics.requests.labels(lease.model_id, job.endpoint, "429").inc()
        raise RateLimited("the server is at capacity; retry shortly", headers={"Retry-After": "1"})
    state.admitted += 1
    state.metrics.running.labels(lease.model_id).inc()
    outcome = _Outcome(state, job, lease, arrived)
    deadline = arrived + sched.request_timeout_secs
    ready_by = min(arrived + sched.max_wait_ms / 1000, deadline)
    stream: RequestStream | None = None
    handed_off = False
    try:
        params = job.sampling.resolve(lease.spec.sampling, sched.default_max_tokens)
        shape = job.shape(model=job.model or lease.model_id, include_usage=job.include_usage)

        async def start() -> Chunk | None:
            nonlocal stream
            stream = await lease.client.submit(lambda rid: job.build(rid, params), ready_by)
            state.metrics.queue_wait.labels(lease.model_id).observe(time.monotonic() - arrived)
            return await stream.next()

        # Wait for the first output before answering, so an engine-side rejection (a prompt
        # longer than the context, say) is an ordinary HTTP error for streaming requests too.
        first = await until_disconnect(request, start())
        assert stream is not None
        queue_wait_us = int((stream.created - arrived) * 1e6)
        headers = {"X-Ax-Stage-Timing": f"queue_wait_us={queue_wait_us}"}
        if job.stream:
            handed_off = True
            return EventStreamResponse(_sse(shape, stream, first, outcome), headers=headers)
        text = await until_disconnect(request, _collect(stream, first, outcome))
        body = shape.complete(
            text, outcome.finish, outcome.prompt_tokens, outcome.completion_tokens, outcome.cached_tokens
        )
        return json_response(body, headers=headers)
    except ClientDisconnected:
        outcome.status = CLIENT_CLOSED
        return Response(status_code=CLIENT_CLOSED)
    except APIError as e:
        outcome.status = e.status
        raise
    except BaseException:
        outcome.status = 500
        raise
    finally:
        if stream is not None and not handed_off:
            stream.cancel()
        if not handed_off:
            outcome.close()


async def _collect(stream: RequestStream, chunk: Chunk | None, outcome: _Outcome) -> str:
    parts: list[str] = []
    while chunk is not None:
        outcome.tokens(chunk, stream)
        parts.append(chunk.text)
        chunk = await stream.next()
    return "".join(parts)


async def _sse(
    shape: ChatShape | CompletionShape, stream: RequestStream, first: Chunk | None, outcome: _Outcome
) -> AsyncIterator[str]:
    try:
        try:
            head = shape.first_chunk()
            if head is not None:
                yield head
            chunk = first
            while chunk is not None:
                outcome.tokens(chunk, stream)
                if chunk.text and chunk.finish_reason and isinstance(shape, ChatShape):
                    yield shape.chunk(chunk.text, None)
                    yield shape.chunk("", chunk.finish_reason)
                else:
                    yield shape.chunk(chunk.text, chunk.finish_reason)
                chunk = await stream.next()
            if shape.include_usage:
                yield shape.usage_chunk(outcome.prompt_tokens, outcome.completion_tokens, outcome.cached_tokens)
        except APIError as e:
            # Mid-stream failure (engine died, timeout): a final error frame, then [DONE].
            outcome.status = e.status
            log.warning("stream %s ended with %s: %s", shape.id, type(e).__name__, e.message)
            yield shape.sse(e.body())
        yield "[DONE]"
    except BaseException:
        # Cancelled (client gone) or a bug: free the engine's slot and say so in metrics.
        if outcome.status == 200:
            outcome.status = CLIENT_CLOSED
        raise
    finally:
        stream.cancel()
        outcome.close()
