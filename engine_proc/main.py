"""The engine process: attach to the rings, load the backend, and run the step loop.

Started by the front with the ``spawn`` context; :func:`engine_main` is the process target. The
loop drains the request ring, advances the backend by one step while it has work, and writes one
:class:`~ipc.records.Step` record per step carrying every sequence's new output. With no work it
sleeps on the request doorbell. It exits when the front says :class:`~ipc.records.Shutdown`, when
the front process disappears, or on a fatal backend error (after reporting it).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import psutil

from engine_proc import logs, utility
from engine_proc.backends import make_backend
from engine_proc.backends.base import Backend, RequestRejected
from engine_proc.spec import EngineSpec
from ipc import fences, records
from ipc.channel import EngineEnd
from ipc.lifetime import die_with_parent

log = logging.getLogger("axserving.engine")

IDLE_WAIT_S = 0.25  # how often an idle engine beats and checks that its front is still there
STATS_INTERVAL_S = 1.0
PENDING_RETRY_S = 0.001  # how soon an idle engine retries events a full ring held back
RECORDS_PER_TURN = 32  # requests taken in per loop turn, before the next step
# An idle engine's first request waits for others sent with it: until GATHER_QUIET_S pass with no
# other, then, once a second one came (a burst), until GATHER_BURST_QUIET_S pass, GATHER_S at most.
# Requests sent together (clients of one batch job, closed-loop clients whose replies ended in one
# step) arrive spread out: 8 closed-loop clients here over 13-30 ms, gaps up to 15 ms (new
# connections), 1-4 ms once connected. Prefilled in one step, they also decode in step with each
# other; started one by one, the first decodes while the others prefill, paced beside it, and
# their replies (and the clients' next requests) stay apart. A lone request pays the first wait.
GATHER_S = 0.060
GATHER_QUIET_S = 0.006
GATHER_BURST_QUIET_S = 0.020
# A lone client's next request does not wait: when the last gather found no company, the step that
# left the engine idle finished one request, and the engine has been idle under LONE_IDLE_S (a
# closed-loop client's turn-around), its request starts at once (a single stream's TTFT was the
# first window longer). Company arriving within GATHER_S of such a start, or a step finishing
# several requests (their clients will be back together), brings the wait back.
LONE_IDLE_S = 1.0
# When the step that left the engine idle finished several requests, under LONE_IDLE_S before, their
# clients are expected back together: the gather waits for as many, up to GATHER_EXPECTED_S, however
# quiet the line is in between. With the bench's client and the front sharing 2 cores with the
# engine, eight closed-loop clients' next requests came up to ~400 ms apart after a 6 ms quiet gap
# (the first then started alone and the others were paced in beside it, ~380 ms stalls each).
GATHER_EXPECTED_S = 0.250


class EngineLoop:
    def __init__(self, spec: EngineSpec, channel: EngineEnd, backend: Backend) -> None:
        self.spec = spec
        self.channel = channel
        self.backend = backend
        self.running = True
        self._pending: dict[tuple[int, int], records.Delta] = {}  # held back by a full event ring
        self.merged_steps = 0
        self.steps = 0
        self.tokens = 0
        self.taken = 0  # records taken from the front
        self._next_stats = 0.0
        self._process = psutil.Process()
        self._max_step = 0.0  # slowest step since the last Stats (0 with native beats)
        self.native_beats = False  # the backend beats inside its steps
        self.gathers = 0  # idle starts that waited for company
        self._lone = False  # the last idle start found no company, and the engine went idle after one
        self._idle_at = 0.0  # when the last step left the engine without work
        self._ended = 0  # how many requests that step finished
        self._alone_at: float | None = None  # a request started without waiting, at

    def front_alive(self) -> bool:
        return os.getppid() == self.spec.front_pid

    def send(self, record: records.ToFront) -> None:
        self.channel.send(record, alive=self.front_alive)

    def handle(self, record: records.ToEngine) -> None:
        if isinstance(record, records.Submit):
            log.debug("request %d: %s accepted", record.rid, record.kind.value, extra={"request_id": record.request_id})
            try:
                if record.kind.utility:
                    assert self.backend.tokenizer is not None
                    self.publish([utility.answer(self.backend.tokenizer, record, self.backend.trusted_messages())])
                    return
                self.backend.submit(record)
            except RequestRejected as e:
                log.info("request %d refused: %s", record.rid, e.message, extra={"request_id": record.request_id})
                self.send(records.Failed(record.rid, e.code, e.message, e.param))
            except Exception as e:  # a bad request must not take the engine down
                log.exception("submit of request %d failed", record.rid, extra={"request_id": record.request_id})
                self.send(records.Failed(record.rid, records.FailCode.engine_error, f"{type(e).__name__}: {e}"))
        elif isinstance(record, records.Abort):
            self.backend.abort(record.rid)
        elif isinstance(record, records.Shutdown):
            self.running = False

    def publish(self, deltas: list[records.Delta]) -> None:
        """Write this step's deltas, never waiting for the front while there is work to do.

        When the event ring is full the deltas are merged per request into what is pending and
        go out with a later step; the front sees fewer, larger records and loses nothing.
        """
        pending = self._pending
        if not pending:  # the usual case: this step's deltas, as they are
            if not deltas:
                return
            step = records.Step(tuple(deltas))
            payload = records.encode(step)
            if self.channel.try_send(payload):
                return
        for d in deltas:
            key = (d.rid, d.index)
            old = pending.get(key)
            pending[key] = d if old is None else records.merge(old, d)
        if not pending:
            return
        step = records.Step(tuple(pending.values()))
        payload = records.encode(step)
        if self.channel.try_send(payload):
            pending.clear()
            return
        self.merged_steps += 1
        if len(payload) > self.channel.max_record() // 2:
            # The front has fallen very far behind: wait for it rather than grow the record
            # past what the ring can carry.
            self.send(step)
            pending.clear()

    def report(self) -> None:
        """Send the engine's counters, at most once a second, only if there is room."""
        now = time.monotonic()
        if now < self._next_stats:
            return
        self._next_stats = now + STATS_INTERVAL_S
        running, waiting = self.backend.occupancy()
        stats = records.Stats(
            running, waiting, self.steps, self.tokens, self.merged_steps, self.backend.preemptions,
            self._max_step, self.backend.prefill_tokens, self.backend.kv_usage(), self._process.memory_info().rss,
            self.backend.drafted_tokens, self.backend.kept_tokens,
        )
        if self.channel.try_send(records.encode(stats)):
            self._max_step = 0.0

    def run_once(self) -> None:
        """One turn of the loop: requests in, one backend step, events out (or sleep)."""
        channel, backend = self.channel, self.backend
        channel.beat()
        self.report()
        # A burst of submissions is taken a bounded number per turn, beating after each, so the
        # running sequences keep stepping and the heartbeat stays fresh.
        idle, before = not backend.has_work(), self.taken
        if not self._take_records():
            return
        if self._alone_at is not None and self.taken > before:
            if not idle and time.monotonic() - self._alone_at < GATHER_S:
                self._lone = False  # company came after all: the next idle start waits again
            self._alone_at = None
        if idle and backend.has_work() and not self._gather(before):
            return
        if backend.has_work():
            began = time.monotonic()
            deltas = backend.step()
            if not self.native_beats:
                self._max_step = max(self._max_step, time.monotonic() - began)
            self.steps += 1
            self.tokens += sum(d.n_tokens for d in deltas)
            if not backend.has_work():
                self._idle_at = time.monotonic()
                self._ended = len({d.rid for d in deltas if d.finish_reason is not None})  # not choices
                if self._ended > 1:
                    self._lone = False
            self.publish(deltas)
            if backend.dropped:
                for rid in backend.dropped:
                    self.send(records.Failed(rid, records.FailCode.cancelled, "the request was cancelled"))
                backend.dropped.clear()
        elif self._pending:
            self.publish([])  # retry what a full ring held back
            if self._pending:
                channel.wait(PENDING_RETRY_S)
        else:
            channel.wait(IDLE_WAIT_S)
            if not self.front_alive():
                log.warning("front process is gone; engine exiting")
                self.running = False

    def _gather(self, before: int) -> bool:
        """An idle engine's first request came: take in the others sent with it (see GATHER_S),
        or as many as the step that left it idle finished (GATHER_EXPECTED_S), unless it is a
        lone client's next request. False once the loop should stop."""
        now = time.monotonic()
        if self._lone and self.taken - before == 1 and now - self._idle_at < LONE_IDLE_S:
            self._alone_at = now
            return True
        self.gathers += 1
        expected = self._ended if self._ended > 1 and now - self._idle_at < LONE_IDLE_S else 0
        deadline = now + GATHER_S
        while True:
            came, at = self.taken - before, time.monotonic()
            if came < expected:
                wait = now + GATHER_EXPECTED_S - at  # the rest, however quiet the line is
            elif expected:
                break  # all expected are in
            else:
                wait = min(deadline - at, GATHER_BURST_QUIET_S if came > 1 else GATHER_QUIET_S)
            if wait <= 0:
                break
            self.channel.wait(wait)
            if not self._take_records():
                return False
            if self.taken - before == came and came >= expected:
                break  # a quiet window passed
        self._lone = self.taken - before == 1
        return True

    def _take_records(self) -> bool:
        """Take in what the front sent, a bounded number (beating after each); False once the
        loop should stop."""
        for _ in range(RECORDS_PER_TURN):
            record = self.channel.recv()
            if record is None:
                break
            self.taken += 1
            self.handle(record)
            self.channel.beat()
            if not self.running:
                return False
        return True

    def run(self) -> None:
        self.backend.cancelled = self.channel.cancelled
        while self.running:
            self.run_once()


def engine_main(spec: EngineSpec) -> None:
    """Process target. Exit code 0 on a requested shutdown, 1 on a fatal error."""
    die_with_parent(signal.SIGKILL)  # the front gone: nothing left to serve
    if spec.nice:
        os.nice(spec.nice)
    # Ctrl-C, `timeout` and systemd signal the whole process group; the engine's life belongs to
    # the front, which stops it in order (Shutdown record), or kills it, or dies (pdeathsig).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.configure(spec.log_level, spec.log_format, f"engine:{spec.model_id}")
    channel = EngineEnd(spec.channel)
    backend = make_backend(spec.backend, spec.config)
    try:
        try:
            info = backend.load()
        except Exception as e:
            log.exception("model load failed")
            channel.send(records.Fatal(f"model load failed: {type(e).__name__}: {e}"))
            sys.exit(1)
        callback = fences.native_heartbeat()
        native = callback is not None and backend.native_heartbeat(callback, channel.heartbeat_address())
        step_s = 0.0 if native else info.step_s
        channel.send(records.Ready(os.getpid(), info.backend, info.n_ctx, info.description, step_s))
        loop = EngineLoop(spec, channel, backend)
        loop.native_beats = native
        try:
            loop.run()
        except Exception as e:
            log.exception("engine step failed")
            try:
                loop.send(records.Fatal(f"engine failed: {type(e).__name__}: {e}"))
            finally:
                sys.exit(1)
    finally:
        backend.close()
        channel.close()
