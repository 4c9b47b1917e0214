"""The per-request event channel between an engine connection and a route.

The connection pushes deltas as engine steps arrive; the route pulls merged chunks. A slow reader
never makes the channel grow without bound in records: pending text is merged into one chunk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from axserving.errors import APIError, RequestTimeout
from ipc.records import Delta, Submit

_MERGE_AT = 64  # pending text pieces before they are joined into one


@dataclass(slots=True)
class Chunk:
    text: str
    n_tokens: int
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class RequestStream:
    def __init__(self, rid: int, on_cancel: Callable[[int], None], deadline: float) -> None:
        """``deadline`` (``time.monotonic()``): past it the request is aborted (RequestTimeout)."""
        self.rid = rid
        self.request: Submit | None = None  # what was sent, for crash blame
        self._on_cancel = on_cancel
        self._parts: list[str] = []
        self._n_tokens = 0
        self._finish: str | None = None
        self._prompt_tokens = 0
        self._completion_tokens = 0
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

    def push(self, delta: Delta) -> None:
        if self._done:
            return
        if delta.text:
            self._parts.append(delta.text)
            if len(self._parts) > _MERGE_AT:
                self._parts = ["".join(self._parts)]
        if delta.n_tokens and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self._n_tokens += delta.n_tokens
        self._prompt_tokens = delta.prompt_tokens or self._prompt_tokens
        self._completion_tokens = delta.completion_tokens
        self._cached_tokens = delta.cached_tokens or self._cached_tokens
        if delta.finish_reason is not None:
            self._finish = delta.finish_reason
            self._done = True
            self._stop_timer()
        self._wake.set()

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
        """The output since the last call (merged), or None once the final chunk went out.

        Raises the request's :class:`APIError` if the engine failed it, or
        :class:`RequestTimeout` past the deadline (the request is aborted in the engine).
        """
        while True:
            if self._parts or self._n_tokens or (self._finish is not None and not self._delivered):
                return self._take()
            if self._error is not None:
                self._delivered = True
                raise self._error
            if self._delivered:
                return None
            self._wake.clear()
            await self._wake.wait()

    def _take(self) -> Chunk:
        chunk = Chunk(
            "".join(self._parts),
            self._n_tokens,
            self._finish,
            self._prompt_tokens,
            self._completion_tokens,
            self._cached_tokens,
        )
        self._parts.clear()
        self._n_tokens = 0
        if self._finish is not None:
            self._delivered = True
        return chunk

    def cancel(self) -> None:
        """The client went away or gave up: free the engine's slot. Idempotent."""
        self._delivered = True
        self._stop_timer()
        if not self._done:
            self._done = True
            self._on_cancel(self.rid)
