"""Keeps one model's engine process running: start, watch, restart with backoff, give up.

States: ``loading`` (first start) → ``ready`` → (death) → ``restarting`` → ``ready`` …; after
``max_restarts`` consecutive failed incarnations the circuit opens: ``failed``. ``stopped`` after
shutdown. An incarnation that served for a while resets the failure count.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from axserving.config import EngineSettings
from axserving.engine.client import EngineClient, EngineState, StateListener
from axserving.engine.connection import EngineConnection, fingerprint
from axserving.engine.stream import RequestStream
from axserving.errors import EngineUnavailable
from engine_proc.spec import BackendConfig, flash_attn_setting
from ipc import records

log = logging.getLogger("axserving.supervisor")

STABLE_AFTER_S = 60.0  # an engine up this long counts as healthy: reset the crash backoff
POISON_CRASHES = 2  # a request in flight at this many engine deaths is refused from then on
_MAX_SUSPECTS = 1024
# The engine's counters (records.Stats fields) that the front reports as monotonic totals,
# "<name>_total" in the snapshot: since the model was loaded, across engine restarts.
TOTALS = ("preemptions", "prefill_tokens", "drafted_tokens", "kept_tokens")


__all__ = ["EngineState", "EngineSupervisor"]


class EngineSupervisor(EngineClient):
    def __init__(
        self,
        model_id: str,
        backend: str,
        backend_config: BackendConfig,
        settings: EngineSettings,
        log_level: str = "info",
        on_event: StateListener | None = None,
        log_format: str = "text",
    ) -> None:
        self.model_id = model_id
        self.backend = backend
        self.backend_config = backend_config
        self.settings = settings
        self.log_level = log_level
        self.log_format = log_format
        self.state = EngineState.loading
        self.restarts = 0
        # What engines that are gone had counted (their last stats): the front's counters
        # stay monotonic across restarts.
        self._past = dict.fromkeys(TOTALS, 0)
        self.last_error: str | None = None
        self.info: records.Ready | None = None
        self.conn: EngineConnection | None = None
        self._on_event = on_event
        self._state_changed = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._suspects: dict[bytes, int] = {}  # request fingerprint -> engine deaths it was in
        self._reopen_at = 0.0  # when an open circuit tries again
        # The first incarnation's outcome: ready, or why it could not start.
        self._first: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # ---- public ------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.conn.pid if self.conn else None

    @property
    def inflight(self) -> int:
        return self.conn.inflight if self.conn is not None else 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"supervisor:{self.model_id}")
        self._task.add_done_callback(self._task_done)

    async def started(self) -> None:
        await asyncio.shield(self._first)

    async def wait_ready(self, deadline: float) -> EngineConnection:
        """The running engine, waiting through a (re)start until ``deadline``."""
        while True:
            if self.state is EngineState.ready and self.conn is not None:
                return self.conn
            if self.state in (EngineState.failed, EngineState.stopped):
                retry = max(1, math.ceil(self._reopen_at - time.monotonic()))
                raise EngineUnavailable(
                    f"model '{self.model_id}' is unavailable: engine {self.state.value}"
                    + (f" ({self.last_error})" if self.last_error else ""),
                    headers={"Retry-After": str(retry)},
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EngineUnavailable(
                    f"model '{self.model_id}' is not ready (engine {self.state.value}); retry shortly"
                )
            self._state_changed.clear()
            try:
                await asyncio.wait_for(self._state_changed.wait(), remaining)
            except TimeoutError:
                pass

    async def submit(
        self, build: Callable[[int], records.Submit], ready_by: float, deadline: float
    ) -> RequestStream:
        conn = await self.wait_ready(ready_by)
        return await conn.submit(build, ready_by, deadline, refuse=self._is_poison)

    def stopping(self) -> None:
        self._stopping = True

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        # Said first: an engine that gets ready while being stopped never counts as started.
        self._first_outcome(EngineUnavailable(f"model '{self.model_id}' was stopped while starting"))
        conn = self.conn
        if conn is not None:
            await conn.stop(timeout)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._set_state(EngineState.stopped)

    def _remember(self, requests: list[records.Submit]) -> None:
        for fp in filter(None, map(fingerprint, requests)):
            self._suspects[fp] = self._suspects.pop(fp, 0) + 1
        while len(self._suspects) > _MAX_SUSPECTS:
            del self._suspects[next(iter(self._suspects))]

    def _is_poison(self, request: records.Submit) -> bool:
        return bool(self._suspects) and self._suspects.get(fingerprint(request), 0) >= POISON_CRASHES

    def stale(self) -> bool:
        conn = self.conn
        return self.state is EngineState.ready and conn is not None and conn.heartbeat_stale()

    def snapshot(self) -> dict[str, Any]:
        conn = self.conn if self.state is EngineState.ready else None
        stats = conn.stats if conn is not None else None
        return {
            "state": self.state.value,
            "pid": conn.pid if conn is not None else None,
            "restarts": self.restarts,
            "backend": self.backend,
            "last_error": self.last_error,
            "inflight": conn.inflight if conn is not None else 0,
            "max_batch": self.backend_config.max_batch,
            "kv_unified": self.backend_config.kv_unified,
            "prefill_slowdown": self.backend_config.prefill_slowdown,
            "prefill_stall_ms": self.backend_config.prefill_stall_ms,
            "flash_attn": flash_attn_setting(self.backend_config),
            "draft_tokens": self.backend_config.draft_tokens,
            "running": stats.running if stats else 0,
            "waiting": stats.waiting if stats else 0,
            "steps": stats.steps if stats else 0,
            "tokens": stats.tokens if stats else 0,
            "merged_steps": stats.merged_steps if stats else 0,
            **{name: getattr(stats, name) if stats else 0 for name in TOTALS},
            **{f"{name}_total": past + (getattr(stats, name) if stats else 0) for name, past in self._past.items()},
            "kv_usage": round(stats.kv_usage, 4) if stats else 0.0,
            "rss_bytes": stats.rss_bytes if stats else 0,
            "safety_drains": conn.safety_drains if conn is not None else 0,
            "heartbeat_age_secs": round(conn.heartbeat_age(), 3) if conn is not None else None,
            "heartbeat_limit_secs": round(conn.heartbeat_limit(), 3) if conn is not None else None,
            "stale": conn.heartbeat_stale() if conn is not None else False,
        }

    # ---- the loop ----------------------------------------------------------------------------

    def _set_state(self, state: EngineState) -> None:
        if state is not self.state:
            log.info("model %s: engine %s → %s", self.model_id, self.state.value, state.value)
        self.state = state
        self._state_changed.set()
        if self._on_event is not None:
            self._on_event(self.model_id, state)

    def _first_outcome(self, error: EngineUnavailable | None) -> None:
        if self._first.done():
            return
        if error is None:
            self._first.set_result(None)
        else:
            self._first.set_exception(error)
            self._first.exception()  # retrieved: nobody need be waiting

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:  # never fail silently: mark the model failed and say why
            log.error("supervisor for %s crashed", self.model_id, exc_info=exc)
            self.last_error = f"supervisor error: {exc}"
            self._set_state(EngineState.failed)
            self._first_outcome(EngineUnavailable(self.last_error))

    async def _run(self) -> None:
        start_failures = 0  # consecutive incarnations that never got ready
        crashes = 0  # consecutive quick deaths after a good start
        while not self._stopping:
            conn = await EngineConnection.open(
                self.model_id,
                self.backend,
                self.backend_config,
                self.settings.request_ring_bytes,
                self.settings.event_ring_bytes,
                self.log_level,
                self.settings.nice,
                self.log_format,
            )
            self.conn = conn
            await conn.start()
            started = time.monotonic()
            try:
                self.info = await asyncio.wait_for(
                    asyncio.shield(conn.ready), self.settings.startup_timeout_secs
                )
            except TimeoutError:
                self.last_error = f"engine not ready after {self.settings.startup_timeout_secs}s"
                log.error("model %s: %s; killing it", self.model_id, self.last_error)
                conn.kill()
            except EngineUnavailable as e:
                self.last_error = e.message
            else:
                if self._stopping:  # stopped while it loaded: it is on its way out
                    await conn.died
                    break
                log.info(
                    "model %s: engine pid %s ready (%s, n_ctx %d) in %.2fs",
                    self.model_id, conn.pid, self.info.backend, self.info.n_ctx, time.monotonic() - started,
                )
                s = self.settings
                conn.watch_heartbeat(s.heartbeat_floor_secs, s.heartbeat_step_factor, s.heartbeat_timeout_secs)
                self._set_state(EngineState.ready)
                self._first_outcome(None)
            code = await conn.died
            if conn.stats is not None:
                for name in TOTALS:
                    self._past[name] += getattr(conn.stats, name)
            was_ready = self.state is EngineState.ready
            if not was_ready:
                self._first_outcome(EngineUnavailable(self.last_error or f"engine exited with code {code}"))
            if self._stopping:
                break
            up_for = time.monotonic() - started
            if was_ready:
                # A crash after a good start: restart (with backoff if it keeps happening), and
                # remember what was in flight, so a request that crashes it again is refused.
                # The circuit is about engines that cannot start, not about poison requests.
                self.last_error = conn.fatal_message or f"engine exited with code {code}"
                log.error("model %s: engine died after %.1fs: %s", self.model_id, up_for, self.last_error)
                self._remember(conn.in_flight)
                start_failures = 0
                crashes = 1 if up_for >= STABLE_AFTER_S else crashes + 1
                n = crashes
            else:
                start_failures += 1
                n = start_failures
            if start_failures > self.settings.max_restarts:
                log.error("model %s: %d consecutive failed starts; circuit open for %gs", self.model_id,
                          start_failures, self.settings.circuit_cooldown_secs)
                self._set_state(EngineState.failed)
                self._reopen_at = time.monotonic() + self.settings.circuit_cooldown_secs
                await asyncio.sleep(self.settings.circuit_cooldown_secs)
                start_failures = self.settings.max_restarts  # half-open: one trial start
                n = 1
            self._set_state(EngineState.restarting)
            self.restarts += 1
            # The first restart at once, then doubling delays.
            delay = 0.0 if n <= 1 else min(
                self.settings.restart_backoff_ms * 2 ** (n - 2), self.settings.restart_backoff_max_ms
            ) / 1000
            await asyncio.sleep(delay)
