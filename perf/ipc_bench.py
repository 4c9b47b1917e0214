"""The engine→front link measured from the front: the shared-memory ring against a pipe and an mp queue.

Two processes, as in the server: the front runs a uvloop event loop and reads events with
``loop.add_reader``; the engine is a ``spawn`` child that writes :class:`~ipc.records.Step` records.
Every transport carries the same msgpack-encoded records (:mod:`ipc.records`):

- ``ring``: :class:`ipc.channel.FrontEnd` / :class:`ipc.channel.EngineEnd`, what the server uses;
- ``pipe``: one ``os.pipe``, 4-byte length-prefixed frames, the front's end non-blocking;
- ``mpqueue``: a ``multiprocessing.Queue`` of encoded bytes, read on the loop without a thread.

Measurements (each run is a fresh child; transports take turns round by round, so machine noise
hits them alike; figures are medians over rounds, latency percentiles are over pooled samples):

1. records/s: the engine sends N one-delta steps back to back; the front drains and decodes them.
2. one-way latency to an idle front: a record every ~2 ms carrying its send time
   (``perf_counter_ns``: CLOCK_MONOTONIC, comparable across processes on Linux).
3. front CPU per token at 1, 8 and 64 sequences per step, paced (a step every ~1 ms, a real
   engine's rate) and unpaced; the front dispatches each delta to a per-request object.
   Unpaced, the engine sends a cycle of steps encoded once, so it always outruns the front and
   the figure is the front's own cost per token with full batches (an engine that encodes each
   step runs at about the front's pace, and the front then flips between a wake-up per record
   and large batches from run to run).
4. lost wake-ups (ring only): ping-pong cycles, each side sleeping on its doorbell in turn.

    .venv/bin/python perf/ipc_bench.py [--quick] [--cycles 100000] [--json PATH]

``--quick`` is a smoke test (small counts, well under 20 s). Exit status: 1 if a wake-up was lost,
2 if a run failed (a child died, a deadline passed), 130 on Ctrl-C.
Only the public channel API is used, so the figures stay comparable while the protocol changes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import multiprocessing
import os
import platform
import queue
import signal
import struct
import sys
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from multiprocessing import reduction
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ipc import records  # noqa: E402
from ipc.channel import ChannelSpec, EngineEnd, FrontEnd  # noqa: E402

CTX = multiprocessing.get_context("spawn")
REQ_RING_BYTES = 1 << 16
EVT_RING_BYTES = 4 << 20  # the server's default event ring (axserving/config.py)
PIPE_BYTES = 1 << 20  # Linux's unprivileged maximum (64 KiB by default): the pipe's best showing
QUEUE_RECORDS = 1 << 16  # the mp queue's bound, in records
READ_CHUNK = 1 << 20
START_TIMEOUT_S = 60.0  # spawn + imports on a busy 2-core machine
JOIN_TIMEOUT_S = 5.0
LATENCY_GAP_S = 0.002
STEP_PERIOD_S = 0.001
PINGPONG_TIMEOUT_S = 1.0
STATS_CODE = "bench_engine_missed_wakeups"
TEXTS = (" the", " model", "ing", ",", " of", " a", " serving", ".")  # token-sized pieces
_LEN = struct.Struct("<I")

Figures = dict[str, dict[str, float]]  # metric → transport → value


class BenchError(Exception):
    """A run failed: the child died, a deadline passed, or a record was not what was sent."""


@dataclass(frozen=True)
class Plan:
    rounds: int
    records: int  # throughput: steps per run
    latency_samples: int  # per transport per round
    paced_steps: int  # CPU runs paced at STEP_PERIOD_S
    # CPU runs back to back: steps = min(tokens // sequences per step, max steps). Long enough
    # for a stable figure: a 40-60 ms run swung 0.55-1.05 µs/token between runs of the same code
    # (a single scheduler hiccup is a large share of it); 0.3-3 s runs, five rounds, medians.
    unpaced_tokens: int
    unpaced_max_steps: int
    unpaced_rounds: int
    cycles: int  # ping-pong
    seqs: tuple[int, ...] = (1, 8, 64)

    def unpaced_steps(self, seqs: int) -> int:
        return max(1, min(self.unpaced_tokens // seqs, self.unpaced_max_steps))


FULL = Plan(rounds=3, records=200_000, latency_samples=1000, paced_steps=1000,
            unpaced_tokens=800_000, unpaced_max_steps=100_000, unpaced_rounds=5, cycles=100_000)
QUICK = Plan(rounds=1, records=20_000, latency_samples=300, paced_steps=200,
             unpaced_tokens=16_000, unpaced_max_steps=8_000, unpaced_rounds=1, cycles=2_000)


@dataclass(frozen=True)
class Job:
    """What the engine child sends: ``steps`` Step records of ``seqs`` one-token deltas each."""

    steps: int
    seqs: int = 1
    gap_s: float = 0.0  # sleep before each step (0: back to back)
    # Send a cycle of steps encoded once (no send times): an engine that costs next to nothing,
    # so the front is always behind and its CPU per token is its own cost, not a tie with the
    # engine's pace (a front that keeps up pays a wake-up per record or two, one that falls
    # behind gets big batches: the same code swung between the two from run to run).
    encode_once: bool = False


ENCODE_CYCLE = 64  # distinct steps in an encode_once cycle


# ---- the child's side of each transport ------------------------------------------------------


class Link(Protocol):
    def send(self, record: records.ToFront) -> None: ...
    def send_encoded(self, payload: bytes) -> None: ...  # an encoded record, as send would write
    def close(self) -> None: ...


class Peer(Protocol):
    """What the front hands its child (picklable); ``open`` runs in the child."""

    def open(self) -> Link: ...


@dataclass(frozen=True)
class RingPeer:
    spec: ChannelSpec

    def open(self) -> RingLink:
        return RingLink(EngineEnd(self.spec))


class RingLink:
    """The engine's channel end, plus sending a record already encoded."""

    def __init__(self, end: EngineEnd) -> None:
        self.end = end
        self.send = end.send
        self.recv = end.recv
        self.wait = end.wait
        self.close = end.close

    def send_encoded(self, payload: bytes) -> None:
        # As EngineEnd.send: wait for room while the front drains.
        delay = 0.0001
        while not self.end.try_send(payload):
            time.sleep(delay)
            delay = min(delay * 2, 0.01)


class _PassedFd:
    """A file descriptor that a ``spawn`` child receives as its own (as :class:`ipc.wakeup.Wakeup`)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_fd, (reduction.DupFd(self.fd),))


def _rebuild_fd(dup: Any) -> _PassedFd:
    return _PassedFd(dup.detach())


@dataclass(frozen=True)
class PipePeer:
    """Its own link. The engine's end stays blocking: a full pipe holds the engine back, as a full
    ring does."""

    wfd: _PassedFd

    def open(self) -> PipePeer:
        return self

    def send(self, record: records.ToFront) -> None:
        self.send_encoded(records.encode(record))

    def send_encoded(self, payload: bytes) -> None:
        frame = _LEN.pack(len(payload)) + payload
        written = os.write(self.wfd.fd, frame)
        if written != len(frame):  # only for frames over PIPE_BUF
            view = memoryview(frame)[written:]
            while view:
                view = view[os.write(self.wfd.fd, view):]

    def close(self) -> None:
        os.close(self.wfd.fd)


@dataclass(frozen=True)
class QueuePeer:
    """Its own link."""

    queue: Any  # multiprocessing.queues.Queue of encoded records

    def open(self) -> QueuePeer:
        return self

    def send(self, record: records.ToFront) -> None:
        self.queue.put(records.encode(record))

    def send_encoded(self, payload: bytes) -> None:
        self.queue.put(payload)

    def close(self) -> None:
        self.queue.close()
        self.queue.join_thread()  # the feeder thread flushes what is still buffered


# ---- the front's side of each transport ------------------------------------------------------


class Front(Protocol):
    name: str

    def peer(self) -> Peer: ...
    def started(self) -> None: ...  # the child holds its own copies of what peer() passed
    def fileno(self) -> int: ...  # readable when drain() has something
    def drain(self) -> list[records.ToFront]: ...
    def close(self) -> None: ...


class RingFront:
    name = "ring"

    def __init__(self) -> None:
        self.channel = FrontEnd.create(REQ_RING_BYTES, EVT_RING_BYTES)

    def peer(self) -> RingPeer:
        return RingPeer(self.channel.spec)

    def started(self) -> None:
        pass

    def fileno(self) -> int:
        return self.channel.fileno()

    def drain(self) -> list[records.ToFront]:
        return self.channel.drain()

    def close(self) -> None:
        self.channel.close()


class PipeFront:
    name = "pipe"

    def __init__(self) -> None:
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        with contextlib.suppress(AttributeError, OSError):  # not Linux, or a lower pipe-max-size
            fcntl.fcntl(self._rfd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        # Read into one reused buffer: os.read(fd, 1 MiB) would allocate (mmap) 1 MiB per call.
        self._buf = bytearray(PIPE_BYTES)
        self._view = memoryview(self._buf)
        self._pending = b""  # the start of a frame that the last read cut
        self._decode = records.to_front_decoder.decode

    def peer(self) -> PipePeer:
        return PipePeer(_PassedFd(self._wfd))

    def started(self) -> None:
        os.close(self._wfd)
        self._wfd = -1

    def fileno(self) -> int:
        return self._rfd

    def drain(self) -> list[records.ToFront]:
        # One read per wake-up: the loop is level-triggered and calls again if more is waiting.
        try:
            n = os.readv(self._rfd, (self._buf,))
        except BlockingIOError:
            return []
        data = memoryview(self._pending + self._view[:n]) if self._pending else self._view[:n]
        out: list[records.ToFront] = []
        decode, off, end = self._decode, 0, len(data)
        while end - off >= _LEN.size:
            (size,) = _LEN.unpack_from(data, off)
            if off + _LEN.size + size > end:
                break
            out.append(decode(data[off + _LEN.size : off + _LEN.size + size]))
            off += _LEN.size + size
        self._pending = bytes(data[off:])
        return out

    def close(self) -> None:
        self._view.release()
        os.close(self._rfd)
        if self._wfd >= 0:
            os.close(self._wfd)


class QueueFront:
    """``multiprocessing.Queue`` read on the loop without a thread.

    Chosen: ``add_reader`` on the queue's pipe (``Queue._reader``, private but stable since 3.x)
    and ``get_nowait()`` until ``Empty``. The other ways need a thread (``run_in_executor(q.get)``)
    and would measure thread hand-offs instead. Records here are under PIPE_BUF, so a readable pipe
    always holds whole messages and ``get_nowait`` never blocks the loop.
    """

    name = "mpqueue"

    def __init__(self) -> None:
        self.queue = CTX.Queue(QUEUE_RECORDS)
        self._decode = records.to_front_decoder.decode

    def peer(self) -> QueuePeer:
        return QueuePeer(self.queue)

    def started(self) -> None:
        pass

    def fileno(self) -> int:
        return int(self.queue._reader.fileno())  # type: ignore[attr-defined]

    def drain(self) -> list[records.ToFront]:
        out: list[records.ToFront] = []
        get, decode = self.queue.get_nowait, self._decode
        while True:
            try:
                payload = get()
            except queue.Empty:
                return out
            out.append(decode(payload))

    def close(self) -> None:
        self.queue.close()


TRANSPORTS: dict[str, Callable[[], Front]] = {"ring": RingFront, "pipe": PipeFront, "mpqueue": QueueFront}


# ---- engine children -------------------------------------------------------------------------


def _child_setup() -> None:
    # Ctrl-C reaches the whole process group; the front stops its children in order. A front that
    # dies takes its child with it, so nothing here waits on a front that is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _step(i: int, seqs: int, stamp: int) -> records.Step:
    n = len(TEXTS)
    return records.Step(tuple(
        records.Delta(rid, TEXTS[(i + rid) % n], 1, None, stamp if rid == 0 else 0, i + 1) for rid in range(seqs)
    ))


def engine_steps(peer: Peer, job: Job) -> None:
    """Child: Ready, then ``job.steps`` steps; the first delta of each carries its send time
    (unless ``job.encode_once``)."""
    _child_setup()
    link = peer.open()
    try:
        link.send(records.Ready(os.getpid(), "ipc-bench", 0))
        if job.encode_once:
            cycle = [records.encode(_step(i, job.seqs, 0)) for i in range(ENCODE_CYCLE)]
            for i in range(job.steps):
                link.send_encoded(cycle[i % ENCODE_CYCLE])
            return
        n = len(TEXTS)
        for i in range(job.steps):
            rest = tuple(
                records.Delta(rid, TEXTS[(i + rid) % n], 1, None, 0, i + 1) for rid in range(1, job.seqs)
            )
            if job.gap_s:
                time.sleep(job.gap_s)
            stamp = time.perf_counter_ns()  # last, so the latency starts at the send
            link.send(records.Step((records.Delta(0, TEXTS[i % n], 1, None, stamp, i + 1), *rest)))
    finally:
        link.close()


def engine_pingpong(peer: RingPeer, timeout_s: float) -> None:
    """Child: answer each Submit with one Step, sleeping on the doorbell (``end.wait``) between.

    Counts waits that ran their full timeout and then found a request waiting (a missed wake-up
    on this side) and reports the count in a final ``Failed`` record after ``Shutdown``.
    """
    _child_setup()
    end = peer.open()
    missed = 0
    slept_through = False
    try:
        end.send(records.Ready(os.getpid(), "ipc-bench-pingpong", 0))
        while True:
            record = end.recv()
            if record is None:
                t0 = time.monotonic()
                end.wait(timeout_s)
                slept_through = time.monotonic() - t0 >= timeout_s
                continue
            missed += slept_through
            slept_through = False
            if isinstance(record, records.Shutdown):
                break
            if isinstance(record, records.Submit):
                end.send(records.Step((records.Delta(record.rid, "x", 1),)))
        end.send(records.Failed(-1, STATS_CODE, str(missed)))
    finally:
        end.close()


# ---- front consumers -------------------------------------------------------------------------


class Consumer(Protocol):
    started: bool
    done: asyncio.Future[None]

    def start(self) -> None: ...  # called on the first wake-up (the engine's Ready), before drain
    def feed(self, batch: list[records.ToFront]) -> None: ...


class _Timed:
    """Wall and CPU time from the wake-up that brings the engine's Ready to the job's last step.

    The clocks start before that first drain: when the front is slow to wake, Ready and many
    steps arrive in one batch, and their decoding must count.
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.received = 0
        self.started = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._t0_ns = 0
        self._cpu0 = 0.0
        self.wall_s = 0.0
        self.cpu_s = 0.0

    def start(self) -> None:
        self.started = True
        self._t0_ns = time.perf_counter_ns()
        self._cpu0 = time.process_time()

    def _check_finished(self) -> None:
        if self.received >= self.steps and not self.done.done():
            self.cpu_s = time.process_time() - self._cpu0
            self.wall_s = (time.perf_counter_ns() - self._t0_ns) / 1e9
            self.done.set_result(None)


class Counter(_Timed):
    """Throughput: decode and count (and count the wake-ups, to see how well the front batches)."""

    def __init__(self, steps: int) -> None:
        super().__init__(steps)
        self.wakeups = 0

    def feed(self, batch: list[records.ToFront]) -> None:
        self.wakeups += 1
        for record in batch:
            if type(record) is records.Step:
                self.received += 1
        self._check_finished()


class Stopwatch(_Timed):
    """Latency: receive time minus the send time carried in the first delta."""

    def __init__(self, steps: int) -> None:
        super().__init__(steps)
        self.samples_ns: list[int] = []

    def feed(self, batch: list[records.ToFront]) -> None:
        now = time.perf_counter_ns()
        for record in batch:
            if type(record) is records.Step:
                self.samples_ns.append(now - record.deltas[0].prompt_tokens)
                self.received += 1
        self._check_finished()


class _Stream:
    """Stands in for the server's per-request stream: collects text, counts tokens."""

    __slots__ = ("parts", "tokens")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.tokens = 0

    def push(self, delta: records.Delta) -> None:
        self.parts.append(delta.text)
        self.tokens += delta.n_tokens
        if len(self.parts) >= 64:
            self.parts.clear()  # a route would have taken them by now


class Dispatcher(_Timed):
    """Front CPU: each delta to its request's stream (a dict lookup and an append), as the server."""

    def __init__(self, steps: int, seqs: int) -> None:
        super().__init__(steps)
        self.streams = {rid: _Stream() for rid in range(seqs)}

    def feed(self, batch: list[records.ToFront]) -> None:
        streams = self.streams
        for record in batch:
            if type(record) is records.Step:
                for delta in record.deltas:
                    streams[delta.rid].push(delta)
                self.received += 1
        self._check_finished()

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.streams.values())


class PingPong:
    """Ring front for the ping-pong: one Submit out, wait for its Step, ``cycles`` times.

    A cycle counts as timed out when its reply took ``timeout_s`` or more; a watchdog also drains
    the ring then, so a missed front wake-up is counted and recovered rather than hanging the run.
    """

    PARAMS = records.SamplingParams(max_tokens=1)

    def __init__(self, channel: FrontEnd, cycles: int, timeout_s: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.channel, self.cycles, self.timeout_s = channel, cycles, timeout_s
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.rtt_ns = array("q")
        self.timeouts = 0
        self.engine_missed = -1
        self.wall_s = 0.0
        self._rid = 0
        self._sent_ns = 0
        self._flagged = False  # this cycle is already counted as timed out
        self._t0_ns = 0
        self.started = False
        self._watchdog: asyncio.TimerHandle | None = None
        self.done.add_done_callback(self._stop_watchdog)

    def feed(self, batch: list[records.ToFront]) -> None:
        for record in batch:
            if type(record) is records.Step:
                self._reply(record)
            elif type(record) is records.Ready:
                self._send()
            elif type(record) is records.Failed and record.code == STATS_CODE:
                self.engine_missed = int(record.message)
                if not self.done.done():
                    self.done.set_result(None)

    def start(self) -> None:
        self.started = True
        self._t0_ns = time.perf_counter_ns()
        self._watchdog = self.loop.call_later(self.timeout_s / 4, self._watch)

    def _stop_watchdog(self, _: object) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _send(self) -> None:
        self._rid += 1
        self._flagged = False
        self._sent_ns = time.perf_counter_ns()
        if not self.channel.try_send(records.Submit(self._rid, self.PARAMS, prompt="x")):
            raise BenchError("request ring full with one request in flight")

    def _reply(self, step: records.Step) -> None:
        rtt = time.perf_counter_ns() - self._sent_ns
        if step.deltas[0].rid != self._rid:
            raise BenchError(f"reply for request {step.deltas[0].rid}, expected {self._rid}")
        self.rtt_ns.append(rtt)
        if rtt >= self.timeout_s * 1e9 and not self._flagged:
            self.timeouts += 1
        if self._rid < self.cycles:
            self._send()
            return
        self.wall_s = (time.perf_counter_ns() - self._t0_ns) / 1e9
        self._rid += 1  # nothing more is in flight
        if not self.channel.try_send(records.Shutdown()):
            raise BenchError("request ring full at shutdown")

    def _watch(self) -> None:
        age_s = (time.perf_counter_ns() - self._sent_ns) / 1e9
        if self._rid <= self.cycles and age_s >= self.timeout_s:
            if not self._flagged:
                self._flagged = True
                self.timeouts += 1
            try:
                self.feed(self.channel.drain())
            except BenchError as e:
                if not self.done.done():
                    self.done.set_exception(e)
                return
            if age_s >= 10 * self.timeout_s and not self.done.done():
                self.done.set_exception(BenchError(f"request {self._rid}: no reply in {age_s:.0f} s"))
                return
        self._watchdog = self.loop.call_later(self.timeout_s / 4, self._watch)


# ---- running one child -----------------------------------------------------------------------


@contextlib.contextmanager
def _sigint_ignored_by_children() -> Iterator[None]:
    """Children started inside inherit SIGINT ignored, so a Ctrl-C while they import does not kill
    them with a traceback (the front stops them in order). A Ctrl-C in these few milliseconds is
    ignored by the front too; blocking it instead does not help: ``Process.start`` unblocks it
    (multiprocessing's resource tracker does, when it checks that its process runs)."""
    old_handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_handler)


@contextlib.contextmanager
def spawned(target: Callable[..., None], *args: object) -> Iterator[BaseProcess]:
    """A spawned child that is joined, or killed, on every exit path."""
    proc = CTX.Process(target=target, args=args, name=f"ipc-bench-{target.__name__}", daemon=True)
    with _sigint_ignored_by_children():
        proc.start()
    try:
        yield proc
    except BaseException:
        proc.kill()  # failed or interrupted: no point waiting for it
        raise
    finally:
        proc.join(JOIN_TIMEOUT_S)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
        proc.close()


async def run_child(
    front: Front, target: Callable[..., None], arg: object, consumer: Consumer, timeout_s: float
) -> None:
    """Run ``target(front.peer(), arg)`` in a child, feeding ``consumer`` on the loop
    until ``consumer.done``; the child is stopped and ``front`` closed on every path."""
    loop = asyncio.get_running_loop()
    done = consumer.done

    def fail(error: BaseException) -> None:
        if not done.done():
            done.set_exception(error)

    def on_events() -> int:
        try:
            if not consumer.started:
                consumer.start()
            batch = front.drain()
            consumer.feed(batch)
            return len(batch)
        except Exception as e:  # the loop would only log a callback's error
            fail(e)
            return 0

    try:
        with spawned(target, front.peer(), arg) as proc:
            front.started()

            def on_exit() -> None:
                loop.remove_reader(proc.sentinel)  # level-triggered: remove or spin
                # What the child wrote before it exited; a drain may stop at its bound (the
                # ring's does, at 1024 records), so read until nothing is left.
                while on_events() and not done.done():
                    pass
                proc.join(1)  # it has exited: this only reaps it, for the exit code
                fail(BenchError(f"{front.name}: child exited (code {proc.exitcode}) before the end"))

            loop.add_reader(front.fileno(), on_events)
            loop.add_reader(proc.sentinel, on_exit)
            try:
                # Not wait_for: on 3.11 it swallows a cancellation (Ctrl-C) that lands in the
                # loop iteration where ``done`` completes.
                async with asyncio.timeout(timeout_s):
                    await done
            except TimeoutError as e:
                raise BenchError(f"{front.name}: no result within {timeout_s:.0f} s") from e
            finally:
                loop.remove_reader(front.fileno())
                loop.remove_reader(proc.sentinel)
    finally:
        front.close()


def _job_timeout(job: Job) -> float:
    return START_TIMEOUT_S + job.steps * (job.gap_s + 20e-6 * job.seqs) * 10


async def run_steps(name: str, job: Job, consumer: Consumer) -> None:
    await run_child(TRANSPORTS[name](), engine_steps, job, consumer, _job_timeout(job))


# ---- measurements ----------------------------------------------------------------------------


def _order(round_: int) -> list[str]:
    """Every transport, starting with a different one each round."""
    names = list(TRANSPORTS)
    k = round_ % len(names)
    return names[k:] + names[:k]


def _turns(rounds: int) -> Iterator[str]:
    for r in range(rounds):
        yield from _order(r)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _pct(ordered: Sequence[float], p: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


async def measure_throughput(plan: Plan) -> Figures:
    job = Job(steps=plan.records)
    runs: dict[str, list[Counter]] = {name: [] for name in TRANSPORTS}
    for name in _turns(plan.rounds):
        counter = Counter(job.steps)
        await run_steps(name, job, counter)
        runs[name].append(counter)
    rows: dict[str, Callable[[Counter], float]] = {
        "records/s": lambda c: c.steps / c.wall_s,
        "front CPU µs/record": lambda c: c.cpu_s * 1e6 / c.steps,
        "front CPU busy %": lambda c: c.cpu_s * 100 / c.wall_s,
        "records per front wake-up": lambda c: c.steps / c.wakeups,
    }
    return {metric: {name: _median([f(c) for c in cs]) for name, cs in runs.items()}
            for metric, f in rows.items()}


async def measure_latency(plan: Plan) -> Figures:
    job = Job(steps=plan.latency_samples, gap_s=LATENCY_GAP_S)
    samples: dict[str, list[int]] = {name: [] for name in TRANSPORTS}
    for name in _turns(plan.rounds):
        watch = Stopwatch(job.steps)
        await run_steps(name, job, watch)
        samples[name] += watch.samples_ns
    figures: Figures = {"p50 µs": {}, "p99 µs": {}, "max µs": {}}
    for name, values in samples.items():
        values.sort()
        figures["p50 µs"][name] = _pct(values, 50) / 1e3
        figures["p99 µs"][name] = _pct(values, 99) / 1e3
        figures["max µs"][name] = values[-1] / 1e3
    return figures


async def measure_cpu(plan: Plan) -> Figures:
    per_token: dict[str, dict[str, list[float]]] = {}
    for r in range(max(plan.rounds, plan.unpaced_rounds)):
        for paced in (True, False):
            if r >= (plan.rounds if paced else plan.unpaced_rounds):
                continue
            for seqs in plan.seqs:
                if paced:
                    job = Job(steps=plan.paced_steps, seqs=seqs, gap_s=STEP_PERIOD_S)
                else:
                    job = Job(steps=plan.unpaced_steps(seqs), seqs=seqs, encode_once=True)
                row = per_token.setdefault(f"{seqs} seq/step, {'paced' if paced else 'unpaced'}", {})
                for name in _order(r):
                    dispatcher = Dispatcher(job.steps, seqs)
                    await run_steps(name, job, dispatcher)
                    if dispatcher.tokens != job.steps * seqs:
                        raise BenchError(f"{name}: {dispatcher.tokens} tokens, sent {job.steps * seqs}")
                    row.setdefault(name, []).append(dispatcher.cpu_s * 1e6 / dispatcher.tokens)
    return {f"{metric} µs/tok": {name: _median(v) for name, v in row.items()}
            for metric, row in per_token.items()}


async def measure_pingpong(cycles: int) -> dict[str, float]:
    front = RingFront()
    pingpong = PingPong(front.channel, cycles, PINGPONG_TIMEOUT_S)
    await run_child(front, engine_pingpong, PINGPONG_TIMEOUT_S, pingpong, START_TIMEOUT_S + cycles * 0.01)
    rtt = sorted(pingpong.rtt_ns)
    return {
        "cycles": cycles,
        "timed-out cycles": pingpong.timeouts,
        "engine waits that slept through a request": pingpong.engine_missed,
        "cycles/s": cycles / pingpong.wall_s,
        "round trip p50 µs": _pct(rtt, 50) / 1e3,
        "round trip p99 µs": _pct(rtt, 99) / 1e3,
        "round trip max µs": rtt[-1] / 1e3,
    }


# ---- report ----------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def print_table(title: str, figures: Figures) -> None:
    names = list(TRANSPORTS)
    width = max(len(m) for m in figures) + 2
    print(f"\n{title}")
    print(f"{'':<{width}}" + "".join(f"{n:>11}" for n in names) + f"{'ring/pipe':>11}{'ring/mpq':>10}")
    for metric, row in figures.items():
        cells = "".join(f"{_fmt(row[n]):>11}" for n in names)
        ratios = f"{row['ring'] / row['pipe']:>11.2f}{row['ring'] / row['mpqueue']:>10.2f}"
        print(f"{metric:<{width}}{cells}{ratios}")


def print_pingpong(figures: dict[str, float]) -> None:
    print(f"\n4. lost wake-ups: ring ping-pong (Submit → end.wait → Step → add_reader), "
          f"{PINGPONG_TIMEOUT_S:.0f} s timeout per cycle")
    for metric, value in figures.items():
        print(f"{metric:<44}{_fmt(value) if isinstance(value, float) else value:>12}")


def lost_wakeups(pingpong: dict[str, float]) -> int:
    return int(pingpong["timed-out cycles"] + pingpong["engine waits that slept through a request"])


def check_targets(cpu: Figures, pingpong: dict[str, float]) -> list[dict[str, Any]]:
    """The issue's targets. The CPU target is read unpaced (steps back to back, so one wake-up
    carries several steps): paced, every transport pays ~25-40 µs of front CPU per wake-up on
    this VM (epoll, the scheduler, cold caches), 3-5 µs/token at 8 seq/step before a byte is
    decoded, so 0.6 µs/token cannot be met paced by any of them. The paced figures are shown
    beside it (``ok`` None: for information)."""
    unpaced, paced = cpu["8 seq/step, unpaced µs/tok"], cpu["8 seq/step, paced µs/tok"]
    ring8, pipe8 = unpaced["ring"], unpaced["pipe"]
    lost = lost_wakeups(pingpong)
    return [
        {"target": "ring front CPU <= 0.6 µs/token at 8 seq/step (unpaced)", "ok": ring8 <= 0.6,
         "value": f"{ring8:.2f} µs/token"},
        {"target": "ring front CPU no worse than the pipe reference at 8 seq/step (unpaced)",
         "ok": ring8 <= pipe8, "value": f"ring {ring8:.2f} vs pipe {pipe8:.2f} µs/token"},
        {"target": "for information: 8 seq/step paced (one wake-up per ~1 ms step)", "ok": None,
         "value": f"ring {paced['ring']:.2f} vs pipe {paced['pipe']:.2f} µs/token "
                  f"(ring/pipe {paced['ring'] / paced['pipe']:.2f})"},
        {"target": "zero lost wake-ups", "ok": lost == 0,
         "value": f"{pingpong['timed-out cycles']} timed-out cycles, "
                  f"{pingpong['engine waits that slept through a request']} engine waits slept through"},
    ]


async def run_all(plan: Plan) -> dict[str, Any]:
    print(f"ipc_bench: {platform.python_implementation()} {platform.python_version()}, "
          f"uvloop {metadata.version('uvloop')}, {os.cpu_count()} CPUs; {plan}", flush=True)
    report: dict[str, Any] = {"plan": asdict(plan)}
    t0 = time.perf_counter()

    report["throughput"] = await measure_throughput(plan)
    print_table(f"1. throughput: {plan.records:,} one-delta steps back to back, front drains and decodes "
                f"(median of {plan.rounds}; higher is better)", report["throughput"])

    report["latency"] = await measure_latency(plan)
    print_table(f"2. one-way latency to an idle front: a step every {LATENCY_GAP_S * 1e3:.0f} ms, "
                f"{plan.latency_samples * plan.rounds:,} samples each (lower is better)", report["latency"])

    report["cpu"] = await measure_cpu(plan)
    unpaced = ", ".join(f"{plan.unpaced_steps(n) * n:,}" for n in plan.seqs)
    print_table(f"3. front CPU per token (decode + dispatch to per-request objects); paced: "
                f"{plan.paced_steps} steps ~{STEP_PERIOD_S * 1e3:.0f} ms apart (median of {plan.rounds}), "
                f"unpaced: {unpaced} tokens back to back (median of {plan.unpaced_rounds}); lower is better",
                report["cpu"])

    report["pingpong"] = await measure_pingpong(plan.cycles)
    print_pingpong(report["pingpong"])

    report["targets"] = check_targets(report["cpu"], report["pingpong"])
    print("\ntargets from the issue:")
    for t in report["targets"]:
        mark = "info" if t["ok"] is None else "OK" if t["ok"] else "MISS"
        print(f"  [{mark}] {t['target']}: {t['value']}")
    report["elapsed_s"] = time.perf_counter() - t0
    print(f"\nelapsed {report['elapsed_s']:.1f} s")
    return report


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts: a smoke test (< 20 s)")
    ap.add_argument("--cycles", type=_positive, help=f"ping-pong cycles (default {FULL.cycles}; "
                    f"{QUICK.cycles} with --quick)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    if args.cycles is not None:
        plan = replace(plan, cycles=args.cycles)
    try:
        # Runner cancels the main task on Ctrl-C, so every run's cleanup runs before it returns.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            report = runner.run(run_all(plan))
    except KeyboardInterrupt:
        print("\ninterrupted; children stopped and channels closed", file=sys.stderr)
        return 130
    except BenchError as e:
        print(f"ipc_bench: {e}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 1 if lost_wakeups(report["pingpong"]) else 0


if __name__ == "__main__":
    sys.exit(main())
