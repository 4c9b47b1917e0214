"""The per-request event channel between an engine connection and a route.

The connection pushes deltas as engine steps arrive; the route pulls merged chunks. A slow reader
never makes the channel grow without bound in records: pending text is merged into one chunk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from axserving.errors import APIError, RequestTimeout
from ipc.records import Delta, Submit, TokenLogprob, ToolCall

_MERGE_AT = 64  # pending text pieces before they are joined into one


@dataclass(slots=True)
class Chunk:
    """One choice's output since the last read."""

    text: str
    n_tokens: int
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int  # this choice's running total
    cached_tokens: int
    index: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    token_ids: bytes = b""
    pieces: tuple[bytes, ...] = ()
    stop_sequence: str = ""
    embedding: bytes = b""


class _Pending:
    """A choice's output not yet read, merged; bounded in records however slow the reader."""

    __slots__ = ("completion_tokens", "embedding", "finish", "logprobs", "n_tokens", "parts", "pieces", "stop_sequence", "token_ids", "tool_calls")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.n_tokens = 0
        self.finish: str | None = None
        self.completion_tokens = 0
        self.logprobs: list[TokenLogprob] = []
        self.tool_calls: list[ToolCall] = []
        self.token_ids = b""
        self.pieces: tuple[bytes, ...] = ()
        self.stop_sequence = ""
        self.embedding = b""


class RequestStream:
    def __init__(self, rid: int, on_cancel: Callable[[int], None], deadline: float, n: int = 1) -> None:
        """``deadline`` (``time.monotonic()``): past it the request is aborted (RequestTimeout).
        ``n``: the request's choices; it is complete when each has finished."""
        self.rid = rid
        self.n = n
        self.request: Submit | None = None  # what was sent, for crash blame
        self._on_cancel = on_cancel
        self._pending: dict[int, _Pending] = {}  # by choice, in the order output arrived
        self._finished = 0
        self._prompt_tokens = 0
        self._cached_tokens = 0
        self._error: APIError | None = None
        self._done = False  # the engine is finished with this request (finish or error)
        self._delivered = False  # the final chunk went out
        self._wake = asyncio.Event()
        self.created = time.monotonic()
        self.first_token_at: float | None = None
        # One timer for the whole request, not one per wait: ``next`` runs once per token.
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            max(deadline - self.created, 0.0), self._expire
        )

    # ---- producer side (the engine connection) -----------------------------------------------

    def push(self, delta: Delta) -> bool:
        """Take a choice's delta; True once the request is complete (every choice finished)."""
        if self._done:
            return True
        p = self._pending.get(delta.index)
        if p is None:
            p = self._pending[delta.index] = _Pending()
        if delta.text:
            p.parts.append(delta.text)
            if len(p.parts) > _MERGE_AT:
                p.parts = ["".join(p.parts)]
        if delta.logprobs:
            p.logprobs += delta.logprobs
        if delta.tool_calls:
            p.tool_calls += delta.tool_calls
        if delta.token_ids:
            p.token_ids += delta.token_ids
            p.pieces += delta.pieces
        if delta.embedding:
            p.embedding = delta.embedding
        if delta.n_tokens and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        p.n_tokens += delta.n_tokens
        self._prompt_tokens = delta.prompt_tokens or self._prompt_tokens
        p.completion_tokens = delta.completion_tokens
        self._cached_tokens = delta.cached_tokens or self._cached_tokens
        if delta.finish_reason is not None:
            p.finish = delta.finish_reason
            p.stop_sequence = delta.stop_sequence
            self._finished += 1
            if self._finished >= self.n:
                self._done = True
                self._stop_timer()
        self._wake.set()
        return self._done
    def fail(self, error: APIError) -> None:
        if self._done:
            return
        self._error = error
        self._done = True
        self._stop_timer()
        self._wake.set()

    def _expire(self) -> None:
        """The deadline passed with the engine not finished: abort it there, and end the stream
        with :class:`RequestTimeout` once the output already received has been taken."""
        self._timer = None
        if self._done:
            return
        self._done = True
        self._error = RequestTimeout("the request took longer than the server's request timeout")
        self._on_cancel(self.rid)
        self._wake.set()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ---- consumer side (the route) -----------------------------------------------------------

    async def next(self) -> Chunk | None:
        """A choice's output since the last call (merged), or None once every choice's final
        chunk went out.

        Raises the request's :class:`APIError` if the engine failed it, or
        :class:`RequestTimeout` past the deadline (the request is aborted in the engine).
        """
        while True:
            if self._pending:
                return self._take()
            if self._error is not None:
                self._delivered = True
                raise self._error
            if self._delivered or (self._done and self._finished >= self.n):
                self._delivered = True
                return None
            self._wake.clear()
            await self._wake.wait()

    def _take(self) -> Chunk:
        index = next(iter(self._pending))
        p = self._pending.pop(index)
        return Chunk(
            "".join(p.parts),
            p.n_tokens,
            p.finish,
            self._prompt_tokens,
            p.completion_tokens,
            self._cached_tokens,
            index,
            p.logprobs,
            p.tool_calls,
            p.token_ids,
            p.pieces,
            p.stop_sequence,
            p.embedding,
        )

    def cancel(self) -> None:
        """The client went away or gave up: free the engine's slot. Idempotent."""
        self._delivered = True
        self._stop_timer()
        if not self._done:
            self._done = True
            self._on_cancel(self.rid)
