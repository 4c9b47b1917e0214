"""The front's admission: who runs now, who waits, who is refused.

One owner of scheduling state. A request runs when the global limit (``max_inflight``, or the
AIMD limit below it) and its model's cap (by default what the engine can run: ``max_batch``
plus a small look-ahead) both have room; otherwise it waits in one bounded queue, for at most
``max_wait_ms`` (the wait only). A freed slot goes to the best waiter that can use it: the
highest priority class after aging (a waiter rises one class per ``aging_ms`` waited, so none
starve), then a client other than the one served last, then the longest waiting.

The overload policy decides what a full queue means: ``queue`` refuses the newcomer (429),
``reject`` never queues (429 as soon as nothing is free), ``shed_oldest`` sheds the oldest
waiter (503) to take the newcomer. Every refusal carries ``Retry-After``.

:meth:`Scheduler.admit` is an async context manager: the slot is held for the body of the
``async with`` and released however it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from axserving.config import OverloadPolicy, SchedulerSettings
from axserving.errors import RateLimited, ServiceUnavailable, UnprocessableRequest

log = logging.getLogger("axserving.scheduler")

AIMD_WINDOW = 50
AIMD_FLOOR = 2


class Priority(enum.IntEnum):
    critical = 0
    high = 1
    normal = 2
    low = 3
    background = 4

    @classmethod
    def parse(cls, raw: str | None, param: str = "priority") -> Priority:
        if raw is None or raw == "":
            return cls.normal
        try:
            return cls[raw.strip().lower()]
        except KeyError:
            names = ", ".join(p.name for p in cls)
            raise UnprocessableRequest(f"'{param}' must be one of {names}, got {raw!r}", param=param) from None


@dataclass(eq=False)
class _Waiter:
    model: str
    cap: int
    priority: Priority
    client: str
    enqueued: float
    seq: int
    granted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class Ticket:
    """A running request's slot."""

    model: str
    client: str
    priority: Priority
    queue_wait: float  # seconds spent waiting for the slot
    started: float


class Scheduler:
    def __init__(self, settings: SchedulerSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.limit = settings.max_inflight  # the AIMD limit, at most max_inflight
        self.inflight = 0
        self.per_model: dict[str, int] = {}
        self.waiting: list[_Waiter] = []
        self._last_client: str | None = None
        self._seq = itertools.count()
        self._e2e: list[float] = []
        self.rejected = 0  # 429s
        self.shed = 0  # waiters shed for newcomers (503)
        self.timed_out = 0  # waiters whose max_wait_ms ran out (503)

    # ---- the caps ------------------------------------------------------------------------------

    def model_cap(self, max_batch: int) -> int:
        s = self.settings
        return s.per_model_max_inflight or max_batch + s.engine_lookahead

    def _room(self, model: str, cap: int) -> bool:
        return self.inflight < self.limit and self.per_model.get(model, 0) < cap

    def queued(self, model: str | None = None) -> int:
        return len(self.waiting) if model is None else sum(w.model == model for w in self.waiting)

    # ---- admission -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admit(
        self, model: str, cap: int, priority: Priority = Priority.normal, client: str = ""
    ) -> AsyncIterator[Ticket]:
        """Hold a slot for ``model`` (at most ``cap`` of its requests run at once) for the body
        of the ``async with``; wait for one (bounded), or raise 429 / 503 with Retry-After."""
        arrived = self.clock()
        await self._acquire(model, cap, priority, client, arrived)
        now = self.clock()
        ticket = Ticket(model, client, priority, now - arrived, now)
        try:
            yield ticket
        finally:
            self._release(model)
            self._observe(self.clock() - arrived)

    async def _acquire(self, model: str, cap: int, priority: Priority, client: str, arrived: float) -> None:
        s = self.settings
        if not self.waiting and self._room(model, cap):
            self._take(model, client)
            return
        if s.overload_policy is OverloadPolicy.reject:
            self.rejected += 1
            raise RateLimited("the server is at capacity; retry shortly")
        if len(self.waiting) >= s.max_queue:
            if s.overload_policy is OverloadPolicy.shed_oldest and self.waiting:
                oldest = min(self.waiting, key=lambda w: w.seq)
                self.waiting.remove(oldest)
                self.shed += 1
                oldest.granted.set_exception(
                    ServiceUnavailable("the server shed this request to make room; retry shortly",
                                       code="shed")
                )
            else:
                self.rejected += 1
                raise RateLimited("the server's queue is full; retry shortly")
        waiter = _Waiter(model, cap, priority, client, arrived, next(self._seq))
        self.waiting.append(waiter)
        self._dispatch()
        remaining = max(arrived + s.max_wait_ms / 1000 - self.clock(), 0.0)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.granted), remaining)
        except TimeoutError:
            if waiter.granted.done() and waiter.granted.exception() is None:
                return  # granted in the same instant the wait ran out: take it
            self._forget(waiter)
            self.timed_out += 1
            raise ServiceUnavailable(
                f"no capacity for {s.max_wait_ms} ms (scheduler.max_wait_ms); retry shortly",
                code="queue_timeout",
            ) from None
        except asyncio.CancelledError:
            # The client left while waiting; if the slot was granted in the meantime, free it.
            if waiter.granted.done() and not waiter.granted.cancelled() and waiter.granted.exception() is None:
                self._release(model)
            self._forget(waiter)
            raise

    def _forget(self, waiter: _Waiter) -> None:
        if waiter in self.waiting:
            self.waiting.remove(waiter)
        if not waiter.granted.done():
            waiter.granted.cancel()
        elif not waiter.granted.cancelled():
            waiter.granted.exception()  # retrieved

    def _take(self, model: str, client: str) -> None:
        self.inflight += 1
        self.per_model[model] = self.per_model.get(model, 0) + 1
        self._last_client = client

    def _release(self, model: str) -> None:
        self.inflight -= 1
        left = self.per_model[model] - 1
        if left:
            self.per_model[model] = left
        else:
            del self.per_model[model]
        self._dispatch()

    def _rank(self, w: _Waiter, now: float) -> tuple[float, int, int]:
        aged = w.priority - (now - w.enqueued) * 1000 / self.settings.aging_ms
        return (math.floor(aged), w.client == self._last_client, w.seq)

    def _dispatch(self) -> None:
        """Hand free slots to the best waiters that can use them."""
        while self.waiting and self.inflight < self.limit:
            now = self.clock()
            eligible = [w for w in self.waiting if self._room(w.model, w.cap)]
            if not eligible:
                return
            best = min(eligible, key=lambda w: self._rank(w, now))
            self.waiting.remove(best)
            self._take(best.model, best.client)
            best.granted.set_result(None)

    # ---- AIMD ----------------------------------------------------------------------------------

    def _observe(self, e2e: float) -> None:
        target = self.settings.target_p99_ms
        if not target:
            return
        self._e2e.append(e2e)
        if len(self._e2e) < AIMD_WINDOW:
            return
        window, self._e2e = sorted(self._e2e), []
        p99 = window[min(len(window) - 1, math.ceil(0.99 * len(window)) - 1)] * 1000
        old = self.limit
        if p99 > target:
            self.limit = max(AIMD_FLOOR, self.limit * 7 // 8)
        elif p99 < 0.8 * target:
            self.limit = min(self.settings.max_inflight, self.limit + 1)
        if self.limit != old:
            log.info("AIMD: e2e p99 %.0f ms against a target of %d ms: limit %d -> %d", p99, target, old, self.limit)
            self._dispatch()
