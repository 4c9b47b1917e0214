"""engine_proc.main.EngineLoop over real rings, in one process, with the fake backend."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from engine_proc.backends.base import BackendConfig
from engine_proc.backends.fake import FakeBackend
from engine_proc.main import EngineLoop, EngineSpec
from ipc import records
from ipc.channel import EngineEnd, FrontEnd


@pytest.fixture
def loop() -> Iterator[tuple[FrontEnd, EngineLoop]]:
    front = FrontEnd.create(1 << 16, 16384)
    end = EngineEnd(front.spec)
    config = BackendConfig(model_path="fake://", options=(("delay_ms", "0"),))
    backend = FakeBackend(config)
    backend.load()
    spec = EngineSpec("m", "fake", config, front.spec, front_pid=os.getppid())
    yield front, EngineLoop(spec, end, backend)
    end.close()
    front.close()


def submit(front: FrontEnd, rid: int, words: int) -> str:
    text = " ".join(f"r{rid}w{i}" for i in range(words))
    assert front.try_send(records.Submit(rid, records.SamplingParams(max_tokens=10_000), prompt=text))
    return text + " "


def test_full_event_ring_never_blocks_the_step_loop(loop: tuple[FrontEnd, EngineLoop]) -> None:
    front, engine = loop
    filler = records.encode(records.Step((records.Delta(-1, "filler"),)))
    while engine.channel.try_send(filler):
        pass  # the front is "slow": its event ring is full before the first step
    expected = {rid: submit(front, rid, 60) for rid in range(3)}
    start = time.monotonic()
    engine.run_once()  # takes the three requests in
    while engine.backend.has_work():
        engine.run_once()  # nobody drains the event ring meanwhile
    assert time.monotonic() - start < 5
    assert engine.merged_steps >= 60, "every step should have been merged"
    got = {rid: "" for rid in expected}
    finished: dict[int, str | None] = {}
    for _ in range(1000):
        for rec in front.drain():
            if isinstance(rec, records.Stats):
                continue
            assert isinstance(rec, records.Step)
            for d in rec.deltas:
                if d.rid < 0:
                    continue
                got[d.rid] += d.text
                if d.finish_reason:
                    finished[d.rid] = d.finish_reason
                    assert d.completion_tokens == 60
        if len(finished) == 3:
            break
        engine.run_once()  # the idle loop retries what the full ring held back
    assert got == expected
    assert finished == {0: "stop", 1: "stop", 2: "stop"}


def test_merge_keeps_totals() -> None:
    a = records.Delta(1, "ab", 2, None, 5, 2)
    b = records.Delta(1, "c", 1, "length", 5, 3)
    assert records.merge(a, b) == records.Delta(1, "abc", 3, "length", 5, 3)


def test_shutdown_stops_the_loop(loop: tuple[FrontEnd, EngineLoop]) -> None:
    front, engine = loop
    assert front.try_send(records.Shutdown())
    engine.run_once()
    assert not engine.running


def test_stats_carry_the_backends_preemptions(loop: tuple[FrontEnd, EngineLoop]) -> None:
    front, engine = loop
    engine.backend.preemptions = 3  # what a backend with a full KV cache would have counted
    engine.run_once()
    stats = [rec for rec in front.drain() if isinstance(rec, records.Stats)]
    assert stats and stats[-1].preemptions == 3
    assert stats[-1].rss_bytes > 1 << 20  # the engine's own resident memory
    assert stats[-1].kv_usage == engine.backend.kv_usage() == 0.0  # nothing running


def test_a_request_the_backend_drops_is_always_reported(loop: tuple[FrontEnd, EngineLoop]) -> None:
    """Issue 11 defect 3, engine side: a cancel bit seen before any Abort ends the request with a
    Failed record, never silently."""
    front, engine = loop
    engine.backend.cancelled = engine.channel.cancelled
    submit(front, 7, 50)
    submit(front, 8, 50)
    engine.run_once()
    front.cancel(7)  # the bit only: no Abort record follows
    engine.run_once()
    failed = [rec for rec in front.drain() if isinstance(rec, records.Failed)]
    assert [(f.rid, f.code) for f in failed] == [(7, "cancelled")]
    assert engine.backend.occupancy() == (1, 0)


def test_a_cancel_bit_is_never_shared_by_two_live_requests() -> None:
    """Issue 11 defect 3, front side: bits are indexed by rid % 4096, so request N + 4096 must
    not be given while N lives (cancelling it dropped N, which then hung)."""
    import asyncio
    import itertools

    from axserving.engine.connection import EngineConnection
    from engine_proc.spec import BackendConfig as Config
    from ipc.ring import FLAG_BITS

    async def main() -> None:
        conn = await EngineConnection.open("m", "fake", Config("fake://"), 1 << 16, 1 << 16, "info")
        try:
            conn._streams = {1: object(), FLAG_BITS + 2: object()}  # type: ignore[dict-item]
            conn._rids = itertools.count(FLAG_BITS + 1)
            assert conn._next_rid() == FLAG_BITS + 3  # slots 1 and 2 are taken by live requests
            assert conn._next_rid() == FLAG_BITS + 4
        finally:
            conn._close_channel()

    asyncio.run(main())


def test_a_closed_connection_reports_no_heartbeat_age() -> None:
    """A status read between an engine's death and the supervisor's state change must not touch
    the unmapped ring (it raised 'released memoryview' on /v1/admin/status)."""
    import asyncio

    from axserving.engine.connection import EngineConnection
    from engine_proc.spec import BackendConfig as Config

    async def main() -> None:
        conn = await EngineConnection.open("m", "fake", Config("fake://"), 1 << 16, 1 << 16, "info")
        conn._close_channel()
        assert conn.heartbeat_age() == 0.0 and not conn.heartbeat_stale()

    asyncio.run(main())


def test_an_idle_engine_gathers_a_burst_into_its_first_step(loop: tuple[FrontEnd, EngineLoop]) -> None:
    """Requests sent together reach the engine spread over some ms (the front takes them one by
    one): an idle engine waits for the rest of a burst before its first step, so they prefill
    together and decode in step; a lone request waits only the short first window."""
    import threading

    from engine_proc.main import GATHER_BURST_QUIET_S, GATHER_QUIET_S, GATHER_S, LONE_IDLE_S

    front, engine = loop
    gaps = (0.002, GATHER_QUIET_S + 0.004)  # the second gap: longer than a lone request's wait

    def send() -> None:
        for rid, gap in enumerate(gaps, start=1):
            time.sleep(gap)
            submit(front, rid, 5)

    assert GATHER_QUIET_S < gaps[1] < GATHER_BURST_QUIET_S and sum(gaps) < GATHER_S
    sender = threading.Thread(target=send)
    submit(front, 0, 5)
    sender.start()
    engine.run_once()
    sender.join()
    assert (engine.taken, engine.steps) == (3, 1)  # all three in the first step

    while engine.backend.has_work():
        engine.run_once()
    front.drain()
    engine._idle_at -= LONE_IDLE_S  # idle a while: the three are not expected back together
    submit(front, 10, 5)
    steps, start = engine.steps, time.monotonic()
    engine.run_once()
    assert (engine.taken, engine.steps) == (4, steps + 1)
    assert time.monotonic() - start < GATHER_S  # alone: it did not wait the whole window


def test_a_lone_clients_next_request_starts_without_waiting(loop: tuple[FrontEnd, EngineLoop]) -> None:
    """A closed-loop single client: once a gather found no company, its next request (the engine
    idle a moment after finishing one) starts at once; a step that finishes several requests
    brings the wait back, for their clients will be back together."""
    front, engine = loop

    def run_alone(rid: int) -> None:
        submit(front, rid, 5)
        engine.run_once()
        while engine.backend.has_work():
            engine.run_once()
        front.drain()

    run_alone(0)
    assert engine.gathers == 1  # nothing known yet: it waited for company, and none came
    run_alone(1)
    run_alone(2)
    assert engine.gathers == 1  # a lone client's next requests did not wait

    for rid in (3, 4):  # two together: a burst, gathered; they finish in one step
        submit(front, rid, 5)
    engine.run_once()
    assert engine.gathers == 2
    while engine.backend.has_work():
        engine.run_once()
    front.drain()
    gathers = engine.gathers
    run_alone(5)
    assert engine.gathers == gathers + 1  # their clients may come back together: it waits again


def test_requests_ended_together_are_awaited_back_together(loop: tuple[FrontEnd, EngineLoop]) -> None:
    """A step that left the engine idle finished three requests: their clients' next requests
    are gathered into one step even when they come further apart than a burst's quiet window
    (client and front busy on the same cores), and a missing one is waited for a bounded time."""
    import threading

    from engine_proc.main import GATHER_BURST_QUIET_S, GATHER_EXPECTED_S, GATHER_S

    front, engine = loop
    for rid in (0, 1, 2):
        submit(front, rid, 5)
    engine.run_once()
    while engine.backend.has_work():
        engine.run_once()
    front.drain()

    gap = GATHER_S + 0.02
    assert GATHER_BURST_QUIET_S < gap < GATHER_EXPECTED_S / 2

    def send() -> None:
        for rid in (11, 12):
            time.sleep(gap)
            submit(front, rid, 5)

    sender = threading.Thread(target=send)
    submit(front, 10, 5)
    sender.start()
    steps, taken, start = engine.steps, engine.taken, time.monotonic()
    engine.run_once()
    sender.join()
    assert (engine.taken, engine.steps) == (taken + 3, steps + 1)  # all three in the first step
    assert time.monotonic() - start < GATHER_EXPECTED_S  # it started once the third came

    while engine.backend.has_work():
        engine.run_once()
    front.drain()
    submit(front, 20, 5)  # one of the three clients comes back
    start = time.monotonic()
    engine.run_once()
    assert engine.taken == taken + 4
    assert GATHER_EXPECTED_S <= time.monotonic() - start < GATHER_EXPECTED_S + 0.1
