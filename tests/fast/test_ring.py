"""ipc.ring: framing, wrap-around, full rings, corruption, and a real second process."""

from __future__ import annotations

import multiprocessing
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.process import BaseProcess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipc import records
from ipc import ring as ring_mod
from ipc.channel import EngineEnd, FrontEnd
from ipc.ring import HEADER_SIZE, Ring, RingError, sweep_orphans

SCANS = {"c": ring_mod._pop_all_c, "py": ring_mod._pop_all_py}


def ident(view: memoryview) -> bytes:
    return bytes(view)


@pytest.fixture(params=list(SCANS), autouse=True)
def scan(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs with the consumer's C scan and with its pure-Python fallback."""
    if request.param == "c" and ring_mod._ringscan is None:
        pytest.skip("ipc._ringscan was not built (test_c_scan_is_built says why that is wrong)")
    monkeypatch.setattr(ring_mod, "_pop_all", SCANS[request.param])
    return str(request.param)


@contextmanager
def spawned_engine(target, *args: object) -> Iterator[tuple[FrontEnd, BaseProcess]]:  # type: ignore[no-untyped-def]
    """A channel and a spawned process running ``target(spec, *args)``; both always cleaned up."""
    front = FrontEnd.create(1 << 16, 1 << 16)
    proc = multiprocessing.get_context("spawn").Process(target=target, args=(front.spec, *args))
    proc.start()
    try:
        yield front, proc
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        front.close()


@pytest.fixture
def ring():
    r = Ring.create("test", 4096)
    yield r
    r.unlink()
    r.close()


def test_round_trip_and_empty(ring: Ring) -> None:
    assert ring.pop(ident) is None
    assert ring.try_write(b"hello")
    assert ring.try_write(b"")
    assert ring.pop(ident) == b"hello"
    assert ring.pop(ident) == b""
    assert ring.pop(ident) is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(min_size=0, max_size=1000), min_size=1, max_size=80))
def test_random_sizes_wrap_and_fill(sizes: list[bytes]) -> None:
    ring = Ring.create("prop", 4096)
    try:
        pending: list[bytes] = []
        for payload in sizes:
            while not ring.try_write(payload):
                assert pending, "an empty ring must accept any record within the limit"
                assert ring.pop(ident) == pending.pop(0)
            pending.append(payload)
        while pending:
            assert ring.pop(ident) == pending.pop(0)
        assert ring.pop(ident) is None
    finally:
        ring.unlink()
        ring.close()


def test_full_ring_refuses_then_accepts(ring: Ring) -> None:
    n = 0
    while ring.try_write(b"x" * 500):
        n += 1
    assert n == 4096 // 512
    assert ring.pop(ident) == b"x" * 500
    assert ring.try_write(b"y" * 500)


def test_oversized_record_is_an_error(ring: Ring) -> None:
    with pytest.raises(ValueError):
        ring.try_write(b"x" * 2000)


def test_attach_checks_nonce_and_header(ring: Ring) -> None:
    with pytest.raises(RingError, match="stale"):
        Ring.attach(ring.name, ring.nonce ^ 1)
    other = Ring.attach(ring.name, ring.nonce)
    other.close()
    ring._buf[0:8] = b"garbage!"
    with pytest.raises(RingError, match="bad ring header"):
        Ring.attach(ring.name, ring.nonce)


def test_corrupt_frame_is_a_typed_error(ring: Ring) -> None:
    assert ring.try_write(b"abc")
    struct.pack_into("<II", ring._buf, HEADER_SIZE, 10_000, 1)
    with pytest.raises(RingError, match="corrupt frame"):
        ring.pop(ident)


def test_attach_missing_name() -> None:
    with pytest.raises(RingError, match="does not exist"):
        Ring.attach("/axs.1.nothere.req", 0)


def _echo_engine(spec) -> None:  # type: ignore[no-untyped-def]
    end = EngineEnd(spec)
    try:
        while True:
            end.wait(5)
            while (rec := end.recv()) is not None:
                if isinstance(rec, records.Shutdown):
                    return
                assert isinstance(rec, records.Submit)
                end.send(records.Step((records.Delta(rec.rid, rec.prompt or "", 1),)))
    finally:
        end.close()


def test_channel_across_processes() -> None:
    with spawned_engine(_echo_engine) as (front, proc):
        params = records.SamplingParams(max_tokens=1)
        got: list[str] = []
        import select

        def drain() -> None:
            for rec in front.drain():
                assert isinstance(rec, records.Step)
                got.extend(d.text for d in rec.deltas)

        for i in range(2000):
            # Like the real front: keep reading events while waiting for request-ring room.
            while not front.try_send(records.Submit(rid=i, params=params, prompt=f"p{i}" * (i % 50))):
                drain()
        while len(got) < 2000:
            select.select([front.fileno()], [], [], 5)
            drain()
        assert got == [f"p{i}" * (i % 50) for i in range(2000)]
        assert front.try_send(records.Shutdown())
        proc.join(10)
        assert proc.exitcode == 0


def test_blob_records_both_ways_across_processes() -> None:
    """Records over a quarter of the ring travel in blob segments, which are unlinked once read."""
    import select

    from tests.server import leaked, shm_names

    before = shm_names()
    with spawned_engine(_echo_engine) as (front, proc):
        params = records.SamplingParams(max_tokens=1)
        sizes = [10, 100_000, 20, 300_000, 5]
        for i, n in enumerate(sizes):
            assert front.try_send(records.Submit(rid=i, params=params, prompt=chr(97 + i) * n))
        got: list[str] = []
        while len(got) < len(sizes):
            select.select([front.fileno()], [], [], 5)
            got.extend(d.text for rec in front.drain() for d in rec.deltas)  # type: ignore[union-attr]
        assert got == [chr(97 + i) * n for i, n in enumerate(sizes)]
        assert front.try_send(records.Shutdown())
        proc.join(10)
        assert proc.exitcode == 0
        assert not {n for n in leaked(before) if n.endswith(".blob")}


def test_sweep_removes_names_of_dead_owners() -> None:
    import posix_ipc

    dead_pid = 2**22 + 12345  # above pid_max on common systems: never alive
    name = f"/axs.{dead_pid}.deadbeef.req"
    posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=4096).close_fd()
    mine = Ring.create("live", 4096)
    try:
        removed = sweep_orphans()
        assert name[1:] in removed
        assert mine.name[1:] not in removed
    finally:
        mine.unlink()
        mine.close()


def test_sleep_handshake_flags(ring: Ring) -> None:
    from ipc import fences

    assert fences.HANDSHAKE, "the ipc._fence extension should be built by the install"
    assert ring.consumer_sleeping()  # a consumer that never ran must be woken
    ring.wake_up()
    assert ring.try_write(b"a")
    assert not ring.needs_wake()  # awake consumer: no doorbell
    assert not ring.prepare_sleep()  # data is waiting: it must not sleep
    assert not ring.consumer_sleeping()
    assert ring.pop(ident) == b"a"
    assert ring.prepare_sleep()
    assert ring.try_write(b"b")
    assert ring.needs_wake()


def _pingpong_engine(spec, cycles: int) -> None:  # type: ignore[no-untyped-def]
    end = EngineEnd(spec)
    try:
        done = 0
        while done < cycles:
            rec = end.recv()
            if rec is None:
                end.wait(5)
                continue
            assert isinstance(rec, records.Submit)
            end.send(records.Step((records.Delta(rec.rid, "", 1),)))
            done += 1
    finally:
        end.close()


def test_no_lost_wakeups_in_sleep_wake_cycles() -> None:
    """Both sides sleep between every record: a lost wake-up would stall a cycle for seconds."""
    import select
    import time

    cycles = 3000
    with spawned_engine(_pingpong_engine, cycles) as (front, proc):
        params = records.SamplingParams(max_tokens=1)
        slow = 0
        for i in range(cycles):
            assert front.try_send(records.Submit(rid=i, params=params, prompt="x"))
            got: list[records.ToFront] = []
            start = time.monotonic()
            while not got:
                ready, _, _ = select.select([front.fileno()], [], [], 2)
                if not ready:
                    slow += 1  # woken by the timeout, not the doorbell: a lost wake-up
                got = front.drain()
            assert time.monotonic() - start < 10
            assert [d.rid for rec in got for d in rec.deltas] == [i]  # type: ignore[union-attr]
        assert slow == 0
        proc.join(10)
        assert proc.exitcode == 0


def test_cancel_flags(ring: Ring) -> None:
    from ipc.ring import FLAG_BITS

    assert not ring.flag(5)
    ring.set_flag(5, True)
    ring.set_flag(6, True)
    assert ring.flag(5) and ring.flag(6) and not ring.flag(7)
    assert ring.flag(5 + FLAG_BITS)  # same slot
    ring.set_flag(5, False)
    assert not ring.flag(5) and ring.flag(6)
    other = Ring.attach(ring.name, ring.nonce)
    try:
        assert other.flag(6)  # visible to the other side of the mapping
    finally:
        other.close()


def test_out_of_sequence_frame_is_a_typed_error(ring: Ring) -> None:
    assert ring.try_write(b"first!!!")
    assert ring.try_write(b"second")
    # Second frame starts after the first (8-byte frame + 8-byte payload); its seq field is at +6.
    struct.pack_into("<H", ring._buf, HEADER_SIZE + 16 + 6, 7)
    assert ring.pop(ident) == b"first!!!"
    with pytest.raises(RingError, match="sequence"):
        ring.pop(ident)


def test_drain_is_bounded_and_resumes() -> None:
    import select

    front = FrontEnd.create(1 << 16, 1 << 20)
    end = EngineEnd(front.spec)
    try:
        for i in range(3000):
            end.send(records.Step((records.Delta(i, "x", 1),)))
        first = front.drain(limit=1024)
        assert len(first) == 1024
        assert front.has_pending()
        assert select.select([front.fileno()], [], [], 0)[0]  # rang itself: the loop comes back
        rest = front.drain(limit=1024) + front.drain(limit=1024)
        assert [r.deltas[0].rid for r in first + rest] == list(range(3000))  # type: ignore[union-attr]
        assert not front.has_pending() and front.evt.consumer_sleeping()
    finally:
        end.close()
        front.close()


def test_drain_that_ends_exactly_at_its_limit_goes_to_sleep() -> None:
    """A drain that stops at its bound with the ring just emptied must still say it sleeps;
    otherwise the next record is not rung and waits for the safety-net timer."""
    import select

    front = FrontEnd.create(1 << 16, 1 << 20)
    end = EngineEnd(front.spec)
    try:
        for i in range(16):
            end.send(records.Step((records.Delta(i, "x", 1),)))
        assert len(front.drain(limit=16)) == 16
        assert front.evt.consumer_sleeping()
        assert not select.select([front.fileno()], [], [], 0)[0]  # nothing rang: nothing waits
        end.send(records.Step((records.Delta(16, "x", 1),)))
        assert select.select([front.fileno()], [], [], 0)[0]  # the next record rings
        assert [r.deltas[0].rid for r in front.drain(limit=16)] == [16]  # type: ignore[union-attr]
    finally:
        end.close()
        front.close()


def test_drain_says_awake_before_clearing_the_doorbell() -> None:
    """A record published while the front drains does not ring (it is read in that drain): no
    wake-up with nothing to read."""
    import select

    front = FrontEnd.create(1 << 16, 1 << 20)
    end = EngineEnd(front.spec)
    try:
        end.send(records.Step((records.Delta(0, "x", 1),)))
        sent = []

        def decode_and_publish(view: memoryview) -> records.ToFront:
            if not sent:
                sent.append(1)
                end.send(records.Step((records.Delta(1, "y", 1),)))  # the front is awake now
            return records.to_front_decoder.decode(view)

        got: list[records.ToFront] = []
        assert not front.evt.drain_into(decode_and_publish, got, 1024, front.to_front.drain)
        assert [r.deltas[0].rid for r in got] == [0, 1]  # type: ignore[union-attr]
        assert not select.select([front.fileno()], [], [], 0)[0]
    finally:
        end.close()
        front.close()


def test_producer_rings_once_per_nap(ring: Ring) -> None:
    """Records written while the consumer naps ring the doorbell once, not once each."""
    assert ring.needs_wake()  # nap 0: a consumer that never ran
    assert not ring.needs_wake()  # already rung for this nap
    assert ring.pop(ident) is None
    assert ring.prepare_sleep()  # a new nap
    assert ring.try_write(b"a")
    assert ring.needs_wake()
    assert ring.try_write(b"b")
    assert not ring.needs_wake()
    ring.wake_up()
    assert ring.pop(ident) == b"a" and ring.pop(ident) == b"b"
    assert ring.prepare_sleep()
    assert ring.try_write(b"c")
    assert ring.needs_wake()  # the next nap rings again


def test_no_lost_wakeups_with_bursts_across_processes() -> None:
    """Bursts of records against a front that naps between them: every burst is delivered
    through the doorbell (a missed ring would stall a burst until the select timeout)."""
    import select

    with spawned_engine(_burst_engine, 300) as (front, proc):
        got: list[int] = []
        slow = 0
        while len(got) < 300 * 5:
            if not select.select([front.fileno()], [], [], 2)[0]:
                slow += 1
            got.extend(d.rid for rec in front.drain(limit=7) for d in rec.deltas)  # type: ignore[union-attr]
            assert slow < 3
        assert got == list(range(300 * 5))
        assert slow == 0
        proc.join(10)
        assert proc.exitcode == 0


def _burst_engine(spec, bursts: int) -> None:  # type: ignore[no-untyped-def]
    import time

    end = EngineEnd(spec)
    try:
        for b in range(bursts):
            for i in range(5):
                end.send(records.Step((records.Delta(b * 5 + i, "x", 1),)))
            time.sleep(0.0005 * (b % 3))
    finally:
        end.close()


# ---- the consumer's scan: C and Python agree, on good frames and on garbage ---------------------


def test_c_scan_is_built_and_selected() -> None:
    assert ring_mod._ringscan is not None, "the ipc._ringscan extension should be built by the install"
    assert ring_mod._ringscan.LAYOUT == (128, 256, HEADER_SIZE, ring_mod.KIND_DATA, ring_mod.KIND_PAD)


def _read_counter(ring: Ring) -> int:
    return int(ring._u64[ring_mod._R])


def test_decode_error_mid_batch_consumes_the_records_before_it(ring: Ring) -> None:
    for i in range(5):
        assert ring.try_write(bytes([i]) * 3)
    calls = []

    def flaky(view: memoryview) -> bytes:
        calls.append(view)
        if view[0] == 2:
            raise KeyError("bad record")
        return bytes(view)

    out: list[bytes] = []
    with pytest.raises(KeyError, match="bad record"):
        ring.pop_all(flaky, out)
    assert out == [b"\0\0\0", b"\1\1\1"]
    assert ring._rseq == 2 and _read_counter(ring) == 2 * 16  # two 16-byte records consumed
    with pytest.raises(ValueError):
        calls[-1][0]  # the failed record's view was released too
    assert ring.pop_all(ident, out) == 3  # the record that failed is read again, then the rest
    assert out[2:] == [bytes([i]) * 3 for i in (2, 3, 4)]
    assert not ring.has_data() and ring._rseq == 5


def test_limit_and_resume(ring: Ring) -> None:
    for i in range(5):
        assert ring.try_write(bytes([i]))
    out: list[bytes] = []
    assert ring.pop_all(ident, out, 3) == 3
    assert ring.pop_all(ident, out, 0) == 0
    assert ring.pop_all(ident, out) == 2
    assert out == [bytes([i]) for i in range(5)]


def test_pad_frame_at_the_wrap(ring: Ring) -> None:
    for _ in range(3):
        assert ring.try_write(b"a" * 1000)  # 3 x 1008 bytes
    assert ring.pop_all(ident, []) == 3
    assert ring.try_write(b"b" * 1000)  # 3024..4032
    assert ring.try_write(b"c" * 100)  # 64 bytes left at the end: a pad frame, then offset 0
    assert ring.pop(ident) == b"b" * 1000
    assert ring.pop(ident) == b"c" * 100
    assert _read_counter(ring) == 4096 + 8 + 104


def test_corrupt_pad_kind_is_a_typed_error(ring: Ring) -> None:
    for _ in range(3):
        assert ring.try_write(b"a" * 1000)
    assert ring.try_write(b"b" * 1000)
    assert ring.pop_all(ident, []) == 4
    assert ring.try_write(b"c" * 100)
    struct.pack_into("<H", ring._buf, HEADER_SIZE + 4032 + 4, 9)  # the pad frame's kind
    with pytest.raises(RingError, match=r"corrupt frame at 4032 \(len=56, kind=9\)"):
        ring.pop(ident)


@pytest.mark.parametrize(
    ("r", "w", "message"),
    [(64, 32, "counters out of range"), (0, 5000, "counters out of range"), (4, 20, "counters out of range")],
)
def test_bad_counters_are_a_typed_error(ring: Ring, r: int, w: int, message: str) -> None:
    ring._u64[ring_mod._R], ring._u64[ring_mod._W] = r, w
    with pytest.raises(RingError, match=message):
        ring.pop(ident)
    assert _read_counter(ring) == r


def test_views_are_read_only_and_released(ring: Ring) -> None:
    assert ring.try_write(b"abcdef")
    kept: list[memoryview] = []

    def keep(view: memoryview) -> bytes:
        assert view.readonly and view.nbytes == 6 and view.format == "B"
        kept.append(view)
        return bytes(view)

    assert ring.pop(keep) == b"abcdef"
    with pytest.raises(ValueError):
        kept[0].tobytes()  # released after decode, whatever decode did with it


def test_a_slice_kept_by_decode_stays_valid(ring: Ring) -> None:
    """Against the contract, but memory-safe: a sub-view keeps the mapping exported."""
    assert ring.try_write(b"abcdef")
    kept = ring.pop(lambda view: view[2:])
    assert kept is not None and bytes(kept) == b"cdef"
    kept.release()


def _snapshot(ring: Ring) -> tuple[bytes, int]:
    return bytes(ring._buf), ring._rseq


def _restore(ring: Ring, snap: tuple[bytes, int]) -> None:
    ring._buf[:] = snap[0]
    ring._rseq = snap[1]


def _outcome(ring: Ring, impl: str, limit: int) -> tuple[object, list[bytes], int, int]:
    out: list[bytes] = []
    try:
        result: object = SCANS[impl](ring, ident, out, limit)
    except RingError as e:
        result = str(e)
    return result, out, _read_counter(ring), ring._rseq


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    records_=st.lists(st.binary(max_size=300), max_size=12),
    read=st.integers(0, 12),
    pokes=st.lists(st.tuples(st.integers(0, 4096 + 7), st.integers(0, 255)), max_size=6),
    counters=st.one_of(st.none(), st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))),
    limit=st.integers(0, 16),
)
def test_c_and_python_scans_agree_on_garbage(
    records_: list[bytes], read: int, pokes: list[tuple[int, int]],
    counters: tuple[int, int] | None, limit: int, scan: str,
) -> None:
    """Valid records, then random bytes poked into frames, payloads and counters: both scans
    give the same records, the same error, the same counters (and neither crashes)."""
    if ring_mod._ringscan is None:
        pytest.skip("ipc._ringscan was not built")
    ring = Ring.create("fuzz", 4096)
    try:
        for i, payload in enumerate(records_):
            if not ring.try_write(payload):
                break
            if i < read:
                assert ring.pop(ident) == payload
        for offset, byte in pokes:
            ring._buf[HEADER_SIZE + min(offset, 4095)] = byte
        if counters is not None:
            ring._u64[ring_mod._R], ring._u64[ring_mod._W] = counters
        snap = _snapshot(ring)
        c = _outcome(ring, "c", limit)
        _restore(ring, snap)
        assert _outcome(ring, "py", limit) == c
    finally:
        ring.unlink()
        ring.close()
