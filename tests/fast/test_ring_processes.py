"""ipc.ring across real processes: property test through a small ring, and a writer killed
mid-record."""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import struct
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipc.ring import Ring
from ipc.wakeup import Wakeup
from tests.fast.test_ring import scan  # noqa: F401  (a fixture: the reader's C scan and its fallback)

CTX = multiprocessing.get_context("spawn")


def _echo(req_name: str, req_nonce: int, evt_name: str, evt_nonce: int, bell_in: Wakeup, bell_out: Wakeup) -> None:
    """Child: copy every record from one ring to the other, byte for byte; b"" means stop."""
    req, evt = Ring.attach(req_name, req_nonce), Ring.attach(evt_name, evt_nonce)
    try:
        while True:
            payload = req.pop(bytes)
            if payload is None:
                bell_in.drain()
                if req.prepare_sleep():
                    select.select([bell_in.fileno()], [], [], 1)
                req.wake_up()
                continue
            if payload == b"":
                return
            while not evt.try_write(payload):
                time.sleep(0.0001)
            if evt.needs_wake():
                bell_out.ring()
    finally:
        req.close()
        evt.close()


class Pair:
    def __init__(self) -> None:
        self.req, self.evt = Ring.create("preq", 4096), Ring.create("pevt", 4096)
        self.bell_in, self.bell_out = Wakeup(), Wakeup()
        self.proc = CTX.Process(
            target=_echo,
            args=(self.req.name, self.req.nonce, self.evt.name, self.evt.nonce, self.bell_in, self.bell_out),
        )
        self.proc.start()

    def roundtrip(self, payloads: list[bytes]) -> list[bytes]:
        got: list[bytes] = []
        pending = list(payloads)
        deadline = time.monotonic() + 30
        while len(got) < len(payloads):
            assert time.monotonic() < deadline, "stalled"
            while pending and self.req.try_write(pending[0]):
                pending.pop(0)
                if self.req.needs_wake():
                    self.bell_in.ring()
            while (p := self.evt.pop(bytes)) is not None:
                got.append(p)
            if len(got) < len(payloads):
                self.bell_out.drain()
                if self.evt.prepare_sleep():
                    select.select([self.bell_out.fileno()], [], [], 0.05)
                self.evt.wake_up()
        return got

    def close(self) -> None:
        while not self.req.try_write(b""):
            time.sleep(0.001)
        self.bell_in.ring()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
        for ring in (self.req, self.evt):
            ring.unlink()
            ring.close()


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(min_size=1, max_size=1000), min_size=1, max_size=60))
def test_random_records_byte_exact_across_processes(pair: Pair, payloads: list[bytes]) -> None:
    assert pair.roundtrip(payloads) == payloads


def _writer(name: str, nonce: int) -> None:
    """Child: write numbered records of varying size forever (until killed)."""
    ring = Ring.attach(name, nonce)
    seq = 0
    while True:
        size = 8 + (seq * 37) % 700
        body = struct.pack("<Q", seq) + bytes([seq % 251]) * (size - 8)
        if ring.try_write(body):
            seq += 1


@pytest.mark.parametrize("delay", [0.01, 0.03, 0.07])
def test_writer_killed_mid_record_leaves_only_whole_records(delay: float) -> None:
    ring = Ring.create("kill", 1 << 20)
    proc = CTX.Process(target=_writer, args=(ring.name, ring.nonce))
    proc.start()
    try:
        expected = 0
        start = time.monotonic()
        # Read concurrently for a while, then kill the writer at an arbitrary point. (The clock
        # is read per record: a reader slower than the writer never sees the ring empty.)
        while time.monotonic() - start < 1.0 + delay:
            if (rec := ring.pop(bytes)) is not None:
                seq = struct.unpack_from("<Q", rec)[0]
                assert seq == expected
                assert len(rec) == 8 + (seq * 37) % 700 and rec[8:] == bytes([seq % 251]) * (len(rec) - 8)
                expected += 1
        os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
        proc.join(5)
        while (rec := ring.pop(bytes)) is not None:
            seq = struct.unpack_from("<Q", rec)[0]
            assert seq == expected
            assert rec[8:] == bytes([seq % 251]) * (len(rec) - 8)
            expected += 1
        assert expected > 100  # it really was writing
        assert not ring.has_data()
    finally:
        if proc.is_alive():
            proc.kill()
        ring.unlink()
        ring.close()
