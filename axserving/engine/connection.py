"""One engine process incarnation as the front sees it: its process, its rings, its requests.

Events are read on the event loop through ``loop.add_reader`` on the engine's doorbell (no
thread); each :class:`~ipc.records.Step` fans out to the per-request streams in one pass. The
process's exit is watched the same way (a pidfd, else the sentinel), so a death is noticed
within milliseconds.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

import msgspec

from axserving.engine.stream import RequestStream
from axserving.errors import (
    APIError,
    EngineUnavailable,
    InvalidRequest,
    ServiceUnavailable,
    UnprocessableRequest,
    from_engine_failure,
)
from engine_proc.spec import BackendConfig, EngineSpec, run_engine
from ipc import records
from ipc.channel import FrontEnd
from ipc.ring import FLAG_BITS, RingError

log = logging.getLogger("axserving.engine")

_SEND_RETRY_S = 0.002
# The longest between two looks at an engine with no event from it: the event ring (in case a
# wake-up was ever lost) and, once watched, the heartbeat, in one timer. A hang is found within an
# eighth of its limit past it (the limit is 2 s at least by default). One timer at 4 Hz rather
# than two at 10 and 5 Hz: every timer wakes the front (~150 us of CPU per wake-up of an idle
# process here); an idle front with one engine went from 17 wake-ups and 2.8 ms of CPU a second
# to 6.5 and 1.2.
_WATCH_S = 0.25
_WATCH_SHARE = 8


def fingerprint(request: records.Submit) -> bytes:
    """What a request is, whatever its rid and request id (a client's retry gets a new one): the
    key crashes are blamed on. Computed only after a crash, or while some request is suspected:
    never on the ordinary request path."""
    try:
        encoded = records.encode(msgspec.structs.replace(request, rid=0, request_id=""))
    except OverflowError:
        return b""
    return hashlib.blake2b(encoded, digest_size=16).digest()


class EngineConnection:
    @classmethod
    async def open(
        cls,
        model_id: str,
        backend: str,
        backend_config: BackendConfig,
        request_ring_bytes: int,
        event_ring_bytes: int,
        log_level: str,
        nice: int = 0,
        log_format: str = "text",
    ) -> EngineConnection:
        """A connection with its rings created (in a thread: mapping them up front takes
        milliseconds that the event loop does not wait for); :meth:`start` spawns the engine."""
        making = asyncio.ensure_future(asyncio.to_thread(FrontEnd.create, request_ring_bytes, event_ring_bytes))
        try:
            channel = await asyncio.shield(making)
        except asyncio.CancelledError:
            await asyncio.wait([making])  # the rings may exist by now: unlink them
            if making.exception() is None:
                making.result().close()
            raise
        return cls(model_id, channel, backend, backend_config, log_level, nice, log_format)

    def __init__(
        self,
        model_id: str,
        channel: FrontEnd,
        backend: str,
        backend_config: BackendConfig,
        log_level: str,
        nice: int = 0,
        log_format: str = "text",
    ) -> None:
        self.model_id = model_id
        self.channel = channel
        self.spec = EngineSpec(
            model_id=model_id,
            backend=backend,
            config=backend_config,
            channel=self.channel.spec,
            front_pid=os.getpid(),
            log_level=log_level.upper(),
            log_format=log_format,
            nice=nice,
        )
        self.process: BaseProcess | None = None
        self.ready: asyncio.Future[records.Ready] = asyncio.get_running_loop().create_future()
        self.died: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.fatal_message: str | None = None
        self._streams: dict[int, RequestStream] = {}
        self._rids = itertools.count(1)
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._watch_timer: asyncio.TimerHandle | None = None
        self._heartbeat_watched = False
        self._pidfd: int | None = None
        self._exit_fd = -1
        self.safety_drains = 0
        self.in_flight: list[records.Submit] = []  # the requests running when it died
        self.stats: records.Stats | None = None
        self._hb = (30.0, 1.0, 30.0)  # floor, factor, cap: set by watch_heartbeat
        self._warm_step = 0.0
        self._recent_steps: collections.deque[float] = collections.deque(maxlen=60)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def inflight(self) -> int:
        return len(self._streams)

    async def start(self) -> None:
        """Spawn the engine process. The spawn (a fork and exec, the spec pickled down a pipe)
        runs in a thread, so the event loop is never held up by it."""
        ctx = multiprocessing.get_context("spawn")
        self.process = ctx.Process(
            target=run_engine, args=(self.spec,), name=f"axs-engine-{self.model_id}", daemon=True
        )
        spawn = asyncio.ensure_future(asyncio.to_thread(self.process.start))
        try:
            await asyncio.shield(spawn)
        finally:
            # Cancelled mid-spawn (the model is being stopped): let the spawn finish, so that
            # the process, if it started, is watched and stopped like any other.
            await asyncio.wait([spawn])
            if spawn.exception() is not None:
                self.channel.close()
                self._closed = True
            else:
                self._watch()

    def _watch(self) -> None:
        assert self.process is not None
        self._loop.add_reader(self.channel.fileno(), self._on_events)
        self._exit_fd = self._watch_exit(self.process)
        self._loop.add_reader(self._exit_fd, self._on_exit)
        self._watch_timer = self._loop.call_later(_WATCH_S, self._look)

    def _watch_exit(self, process: BaseProcess) -> int:
        """An fd readable once the process has exited: a pidfd on Linux (exact, and immune to
        a grandchild holding an inherited pipe end), else multiprocessing's sentinel pipe."""
        if hasattr(os, "pidfd_open") and process.pid is not None:
            try:
                self._pidfd = os.pidfd_open(process.pid)
                return self._pidfd
            except OSError:
                pass
        return process.sentinel

    # ---- events ------------------------------------------------------------------------------

    def _on_events(self) -> bool:
        """Deliver what the engine published (one bounded drain); False if the ring is corrupt."""
        try:
            for record in self.channel.drain():
                self._dispatch(record)
        except RingError as e:
            # A corrupt ring means the engine cannot be trusted: treat it as dead.
            log.error("engine %s: %s; killing it", self.model_id, e)
            self.fatal_message = str(e)
            self.kill()
            return False
        except Exception as e:
            # A bug in dispatching: the rest of this batch is lost, so no stream of this engine
            # can be trusted to finish. Fail them all now (through the death path) and restart.
            log.exception("engine %s: dispatching its events failed; restarting it", self.model_id)
            self.fatal_message = f"the front failed on the engine's events ({type(e).__name__}: {e})"
            self.fail_all(EngineUnavailable(f"the model's engine was restarted ({self.fatal_message}); retry shortly"))
            self.kill()
            return False
        return True

    def _look(self) -> None:
        """The watch timer (:data:`_WATCH_S`): events left in the ring, then the heartbeat."""
        self._watch_timer = None
        if self._closed or self.died.done():
            return
        if self.channel.has_pending():
            # Normally the doorbell's callback got there first; finding events here means it
            # has not run yet, or a wake-up was lost. Either way, deliver them now.
            self.safety_drains += 1
            if not self._on_events():
                return  # killed: the death path takes it from here
        period = _WATCH_S
        if self._heartbeat_watched:
            age, limit = self.channel.heartbeat_age(), self.heartbeat_limit()
            if age > limit:
                self.fatal_message = f"engine hung: no heartbeat for {age:.1f}s (limit {limit:.1f}s)"
                log.error("model %s: %s; killing pid %s", self.model_id, self.fatal_message, self.pid)
                self.kill()
                return
            period = min(period, limit / _WATCH_SHARE)
        self._watch_timer = self._loop.call_later(period, self._look)

    def _dispatch(self, record: records.ToFront) -> None:
        if isinstance(record, records.Step):
            streams = self._streams
            for delta in record.deltas:
                stream = streams.get(delta.rid)
                if stream is not None and stream.push(delta):
                    del streams[delta.rid]
        elif isinstance(record, records.Failed):
            failed = self._streams.pop(record.rid, None)
            if failed is not None:
                failed.fail(from_engine_failure(record.code, record.message, record.param))
        elif isinstance(record, records.Ready):
            self._warm_step = record.step_s
            if not self.ready.done():
                self.ready.set_result(record)
            # The engine unlinked the names on attach; make sure even if it did not.
            self.channel.unlink()
        elif isinstance(record, records.Stats):
            self.stats = record
            self._recent_steps.append(record.max_step_s)
        elif isinstance(record, records.Fatal):
            self.fatal_message = record.message
            log.error("engine %s reported a fatal error: %s", self.model_id, record.message)

    def _on_exit(self) -> None:
        assert self.process is not None
        self._loop.remove_reader(self._exit_fd)  # level-triggered: remove or spin
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        # Read what the engine wrote before it died (a Fatal record, final deltas): all of it,
        # since one drain stops at its bound.
        while self._on_events() and self.channel.has_pending():
            pass
        self.process.join(0)
        code = self.process.exitcode
        if code is None:
            # The sentinel closes while the child is still exiting, a moment before it can be
            # reaped: collect it shortly so no zombie is left behind.
            self._loop.call_later(0.01, self._reap, 100)
        exited = f"engine process exited with code {code}" if code is not None else "engine process died"
        reason = self.fatal_message or exited
        self.in_flight = [s.request for s in self._streams.values() if s.request is not None]
        self.fail_all(EngineUnavailable(f"the model's engine stopped ({reason}); retry shortly"))
        self._close_channel()
        if not self.ready.done():
            self.ready.set_exception(EngineUnavailable(f"engine failed to start: {reason}"))
            self.ready.exception()  # mark retrieved; the supervisor reads `died`
        if not self.died.done():
            self.died.set_result(code)

    def heartbeat_limit(self) -> float:
        """How old the heartbeat may get: ``factor`` times the slowest step this engine is known
        to take (its warm-up step, and the slowest of the last minute's), never under ``floor``
        nor over ``cap``. A small model's hang is found in seconds; a big model's long prefill
        chunk is not taken for one."""
        floor, factor, cap = self._hb
        slowest = max(self._warm_step, max(self._recent_steps, default=0.0))
        return min(cap, max(floor, factor * slowest))

    def heartbeat_stale(self) -> bool:
        """Past half the limit: shown in /health (and not ready) before the kill."""
        return not self._closed and self.heartbeat_age() > self.heartbeat_limit() / 2

    def heartbeat_age(self) -> float:
        """0 once the channel is closed (the engine is gone: its death, not a hang, is reported;
        a status read may come between the close and the supervisor's state change)."""
        return 0.0 if self._closed else self.channel.heartbeat_age()

    def watch_heartbeat(self, floor: float, factor: float, cap: float) -> None:
        """Kill the engine once its heartbeat is older than :meth:`heartbeat_limit` (SIGSTOP, a
        stuck native call), checked by the watch timer. The kill goes through the ordinary death
        path: requests fail at once, the supervisor restarts the engine."""
        self._hb = (floor, factor, cap)
        self._heartbeat_watched = True
        if self._watch_timer is not None and not self._closed:
            self._watch_timer.cancel()
            self._watch_timer = self._loop.call_later(min(_WATCH_S, self.heartbeat_limit() / _WATCH_SHARE), self._look)

    def _reap(self, tries: int) -> None:
        assert self.process is not None
        self.process.join(0)
        if self.process.exitcode is None and tries > 0:
            self._loop.call_later(0.01, self._reap, tries - 1)

    # ---- requests ----------------------------------------------------------------------------

    async def submit(
        self,
        build: Callable[[int], records.Submit],
        ready_by: float,
        deadline: float,
        refuse: Callable[[records.Submit], bool] | None = None,
    ) -> RequestStream:
        """``ready_by`` bounds the wait for room in the request ring; ``deadline`` the request.
        ``refuse(request)`` true: the request crashed engines before, and is refused."""
        if self._closed or self.died.done():
            raise EngineUnavailable("the model's engine is not running; retry shortly")
        if len(self._streams) >= FLAG_BITS:
            raise ServiceUnavailable("too many requests in flight on this engine; retry shortly")
        rid = self._next_rid()
        record = build(rid)
        if refuse is not None and refuse(record):
            raise UnprocessableRequest(
                "this request was in flight each time the model's engine crashed, twice; it is refused",
                code="request_crashed_engine",
            )
        self.channel.reuse_slot(rid)
        while not self._try_send(record):
            if time.monotonic() > ready_by:
                raise ServiceUnavailable("the engine's request ring stayed full; try again later")
            await asyncio.sleep(_SEND_RETRY_S)
            if self._closed:
                raise EngineUnavailable("the model's engine stopped; retry shortly")
        stream = RequestStream(rid, self._abort, deadline, record.gen.n)
        stream.request = record
        self._streams[rid] = stream
        return stream

    def _next_rid(self) -> int:
        """A fresh rid whose cancel bit (``rid % FLAG_BITS``) no live request shares: setting
        one request's bit must never stop another (the caller keeps fewer than FLAG_BITS
        requests live, so one is always free)."""
        live = {r % FLAG_BITS for r in self._streams}
        rid = next(self._rids)
        while rid % FLAG_BITS in live:
            rid = next(self._rids)
        return rid

    def _try_send(self, record: records.Submit) -> bool:
        try:
            return self.channel.try_send(record)
        except OSError as e:  # a large request's blob segment: /dev/shm is full
            log.error("cannot write a request blob for %s: %s", self.model_id, e)
            raise ServiceUnavailable("the server is out of shared memory; retry later") from e
        except OverflowError as e:  # a value the record cannot carry (the routes bound them first)
            raise InvalidRequest(f"a value in the request is out of range: {e}") from e

    def _abort(self, rid: int) -> None:
        if self._streams.pop(rid, None) is None or self._closed:
            return
        self.channel.cancel(rid)
        if not self.channel.try_send(records.Abort(rid)):
            # Ring full: retry shortly rather than leave the sequence running.
            self._loop.call_later(_SEND_RETRY_S, self._resend_abort, rid)

    def _resend_abort(self, rid: int) -> None:
        if not self._closed and not self.channel.try_send(records.Abort(rid)):
            self._loop.call_later(_SEND_RETRY_S, self._resend_abort, rid)

    def fail_all(self, error: APIError) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.fail(error)

    # ---- shutdown ----------------------------------------------------------------------------

    def request_shutdown(self) -> bool:
        if self._closed:
            return False
        return self.channel.try_send(records.Shutdown())

    def kill(self) -> None:
        if self.process is not None and self.process.exitcode is None:
            self.process.kill()

    def _close_channel(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watch_timer is not None:
            self._watch_timer.cancel()
            self._watch_timer = None
        try:
            self._loop.remove_reader(self.channel.fileno())
        except (ValueError, OSError):
            pass
        self.channel.close()

    async def stop(self, timeout: float) -> None:
        """Ask the engine to exit, then kill it if it does not within ``timeout``."""
        if self.process is None:
            self._close_channel()
            return
        if not self.died.done():
            self.request_shutdown()
            try:
                await asyncio.wait_for(asyncio.shield(self.died), timeout)
            except TimeoutError:
                log.warning("engine %s did not exit in %.1fs; killing it", self.model_id, timeout)
                self.kill()
                await asyncio.wait_for(asyncio.shield(self.died), 5)
        self._close_channel()
