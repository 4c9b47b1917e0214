"""A single-producer / single-consumer byte ring in POSIX shared memory.

Layout (all integers little-endian, counters 8-byte aligned on their own 128-byte line so the
producer and the consumer never write the same cache line)::

    0    magic u64 | version u32 | header_size u32 | capacity u64 | nonce u64 | creator pid u64
    128  write counter u64   (producer only; monotonic byte count)
    256  read counter u64    (consumer only; monotonic byte count)
    264  sleep word u64      (consumer only: naps << 1 | 1 while it is, or is about to be,
                             asleep; naps << 1 while awake)
    384  heartbeat u64       (producer only: its CLOCK_MONOTONIC ns, to tell a hung writer)
    512  flags[4096 bits]    (producer only: a cancel bit per request slot, rid % 4096)
    1024 data[capacity]      (capacity a power of two)

A record is an 8-byte frame ``length u32 | kind u16 | sequence u16`` followed by the payload,
padded to 8 bytes; the sequence (low 16 bits of a per-ring record count) lets the reader tell a
torn or stale frame from the next record.
When a record does not fit before the end of the data area, a pad frame fills the rest and the
record starts again at offset 0, so every payload is one contiguous slice that can be decoded in
place. The producer writes payload and frame first and publishes by storing the write counter
(an aligned 8-byte store); a writer that dies mid-record therefore leaves nothing visible.

Wake-ups: a consumer about to block counts a new nap and stores the sleep word with its low bit
set, fences, and looks once more for data (:meth:`Ring.prepare_sleep`); a producer publishes,
fences, and rings the doorbell only if the consumer said it sleeps (:meth:`Ring.needs_wake`).
With a full fence on both sides at least one of them sees the other's store, so no wake-up is
lost (see :mod:`ipc.fences`). The producer rings once per nap: the word it rang for is
remembered, so the records that follow until the consumer wakes cost no system call. (A nap
ends when the consumer runs again, whether or not it really blocked: a front going back to its
event loop with work pending says "asleep" too, and rang for every record until it drained.)
"""

from __future__ import annotations

import ctypes
import mmap
import os
import secrets
import struct
import time
from collections.abc import Callable
from typing import TypeVar

import posix_ipc

from ipc import fences

try:
    from ipc import _ringscan
except ImportError:  # the optional extension was not built: the pure-Python loop below
    _ringscan = None  # type: ignore[assignment]  # noqa: F811

MAGIC = 0x41585352494E4731  # "AXSRING1"
VERSION = 3  # 3: the sleep word counts naps
HEADER_SIZE = 1024
FLAG_BITS = 4096
_FLAGS = 512
_HEAD = struct.Struct("<QIIQQQ")
_FRAME = struct.Struct("<IHH")  # 8 bytes; _pop_all relies on that size
_W = 128 // 8  # index of the write counter in the u64 view
_R = 256 // 8
_SLEEP = 264 // 8
# Counter fences that are real instructions only on weakly ordered CPUs: None elsewhere, so the
# hot path does not even pay for a call.
_ACQUIRE = fences.acquire if fences.WEAKLY_ORDERED else None
_RELEASE = fences.release if fences.WEAKLY_ORDERED else None
# The handshake's full fence; None without the extension (writers then always ring).
_FULL = fences.full if fences.HANDSHAKE else None
_HB = 384 // 8
# Map every page up front (Linux): a fresh ring otherwise costs each side a page fault per page
# on first touch, in the middle of its hot loop.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
KIND_DATA = 1
KIND_PAD = 2
NAME_PREFIX = "axs."
T = TypeVar("T")


class RingError(Exception):
    """The ring cannot be used: bad header, wrong nonce, corrupt frame. Treat as engine death."""


class RecordTooLarge(ValueError):
    """The record can never fit this ring (larger than a quarter of it)."""


def _align8(n: int) -> int:
    return (n + 7) & ~7


def ring_name(role: str) -> str:
    """A fresh shared-memory name carrying the owner pid, so a sweep can tell orphans."""
    return f"/{NAME_PREFIX}{os.getpid()}.{secrets.token_hex(6)}.{role}"


class Ring:
    """One end of a ring. Create with :meth:`create` (front) or :meth:`attach` (engine)."""

    def __init__(self, name: str, mm: mmap.mmap, nonce: int) -> None:
        self.name = name
        self._mm = mm
        self._buf = memoryview(mm)
        self._u64 = self._buf[:HEADER_SIZE].cast("Q")
        self.capacity = len(mm) - HEADER_SIZE
        self._mask = self.capacity - 1
        self._data = self._buf[HEADER_SIZE:]
        self._data_ro = self._data.toreadonly()  # what decoders get slices of (C scan)
        self.nonce = nonce
        self._unlinked = False
        self._wseq = 0  # producer: records written (low 16 bits go in the frame)
        self._rseq = 0  # consumer: records read
        self._max_record = self.capacity // 4 - _FRAME.size
        # Producer: the read counter as last loaded. It only grows, so room computed from it is
        # never more than the real room; the shared line is re-read only when that looks short
        # (the consumer writes that line on every drain: each load after it did is a cache miss).
        self._r_seen = 0
        self._naps = 0  # consumer: times it said it goes to sleep
        self._rung = 0  # producer: the sleep word it last rang the doorbell for

    # ---- life cycle ------------------------------------------------------------------------

    @classmethod
    def create(cls, role: str, capacity: int) -> Ring:
        if capacity < 4096 or capacity & (capacity - 1):
            raise ValueError("ring capacity must be a power of two >= 4096")
        name = ring_name(role)
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=HEADER_SIZE + capacity)
        try:
            if hasattr(os, "posix_fallocate"):
                # Reserve the pages now: a full /dev/shm fails here, not as SIGBUS mid-write.
                os.posix_fallocate(shm.fd, 0, HEADER_SIZE + capacity)
            mm = mmap.mmap(shm.fd, shm.size, flags=_MAP_FLAGS)
        except BaseException:
            shm.close_fd()
            posix_ipc.unlink_shared_memory(name)
            raise
        shm.close_fd()
        nonce = secrets.randbits(64)
        _HEAD.pack_into(mm, 0, MAGIC, VERSION, HEADER_SIZE, capacity, nonce, os.getpid())
        ring = cls(name, mm, nonce)
        ring._u64[_W] = 0
        ring._u64[_R] = 0
        ring._u64[_SLEEP] = 1  # nap 0: the consumer has not started; wake it for the first record
        ring._u64[_HB] = time.monotonic_ns()
        return ring

    @classmethod
    def attach(cls, name: str, nonce: int) -> Ring:
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError as e:
            raise RingError(f"shared memory {name} does not exist") from e
        try:
            mm = mmap.mmap(shm.fd, shm.size, flags=_MAP_FLAGS)
        finally:
            shm.close_fd()
        magic, version, header_size, capacity, got_nonce, _pid = _HEAD.unpack_from(mm, 0)
        if magic != MAGIC or version != VERSION or header_size != HEADER_SIZE:
            mm.close()
            raise RingError(f"{name}: bad ring header (magic {magic:#x}, version {version})")
        if capacity + HEADER_SIZE != len(mm):
            mm.close()
            raise RingError(f"{name}: capacity {capacity} does not match size {len(mm)}")
        if got_nonce != nonce:
            mm.close()
            raise RingError(f"{name}: stale ring (nonce mismatch)")
        return cls(name, mm, nonce)

    def unlink(self) -> None:
        """Remove the name (the mapping stays valid). Idempotent."""
        if self._unlinked:
            return
        self._unlinked = True
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass

    def close(self) -> None:
        if self._mm.closed:
            return
        for view in (self._u64, self._data_ro, self._data, self._buf):
            view.release()
        self._mm.close()

    # ---- heartbeat ---------------------------------------------------------------------------

    def beat(self) -> None:
        """Producer: I am alive (an aligned 8-byte store of CLOCK_MONOTONIC ns)."""
        self._u64[_HB] = time.monotonic_ns()

    def heartbeat_address(self) -> int:
        """Where the heartbeat lives in this process's mapping, for a native callback to store
        into (valid while the ring is open: unregister the callback before :meth:`close`)."""
        probe = ctypes.c_uint64.from_buffer(self._mm, _HB * 8)
        try:
            return ctypes.addressof(probe)
        finally:
            del probe  # no buffer export may outlive this call, or the mmap could not close

    def heartbeat_age(self) -> float:
        """Seconds since the producer last called :meth:`beat` (CLOCK_MONOTONIC is system-wide)."""
        return (time.monotonic_ns() - self._u64[_HB]) / 1e9

    # ---- per-request flags (the request ring's cancel bits) -----------------------------------

    def set_flag(self, rid: int, on: bool) -> None:
        """Producer: set or clear request ``rid``'s bit (slot ``rid % FLAG_BITS``)."""
        slot = rid % FLAG_BITS
        index, bit = _FLAGS + slot // 8, 1 << (slot % 8)
        buf = self._buf
        buf[index] = (buf[index] | bit) if on else (buf[index] & ~bit)

    def flag(self, rid: int) -> bool:
        slot = rid % FLAG_BITS
        return bool(self._buf[_FLAGS + slot // 8] & (1 << (slot % 8)))

    # ---- wake-up handshake -------------------------------------------------------------------

    def needs_wake(self) -> bool:
        """Producer, after publishing: must the doorbell ring?"""
        if _FULL is None:
            return True
        _FULL()  # the counter store above must be visible before the flag is read
        word = self._u64[_SLEEP]
        if word & 1 and word != self._rung:
            self._rung = word  # once per nap: later records find the doorbell already rung
            return True
        return False

    def prepare_sleep(self) -> bool:
        """Consumer, before blocking: True if it may sleep (it said so and nothing is waiting)."""
        u64 = self._u64
        self._naps += 1
        u64[_SLEEP] = self._naps << 1 | 1
        fences.full()  # the flag store must be visible before the counter is read
        if u64[_W] != u64[_R]:
            u64[_SLEEP] = self._naps << 1
            return False
        return True

    def wake_up(self) -> None:
        """Consumer: awake and draining; producers need not ring."""
        self._u64[_SLEEP] = self._naps << 1

    # ---- producer ----------------------------------------------------------------------------

    def free_space(self) -> int:
        return self.capacity - (self._u64[_W] - self._u64[_R])

    def max_record(self) -> int:
        return self._max_record

    def try_write(self, payload: bytes) -> bool:
        """Append one record; False when the ring has no room for it now.

        This is the engine's per-step hot path: locals only, no helper calls, and the consumer's
        counter line is read only when the room last seen does not suffice.
        """
        n = len(payload)
        if n > self._max_record:
            raise RecordTooLarge(f"record of {n} bytes exceeds ring limit {self._max_record}")
        need = 8 + ((n + 7) & ~7)  # frame + payload padded to 8 bytes
        u64, cap = self._u64, self.capacity
        w = u64[_W]
        pos = w & self._mask
        tail = cap - pos
        pad = tail if tail < need else 0
        if need + pad > cap - (w - self._r_seen):
            self._r_seen = u64[_R]
            if need + pad > cap - (w - self._r_seen):
                return False
        data = self._data
        if pad:
            _FRAME.pack_into(data, pos, tail - 8, KIND_PAD, 0)
            pos = 0
        _FRAME.pack_into(data, pos, n, KIND_DATA, self._wseq & 0xFFFF)
        data[pos + 8 : pos + 8 + n] = payload
        self._wseq += 1
        if _RELEASE is not None:
            _RELEASE()  # payload and frame before the counter that publishes them
        u64[_W] = w + pad + need  # publish
        return True

    # ---- consumer ----------------------------------------------------------------------------

    def has_data(self) -> bool:
        return self._u64[_W] != self._u64[_R]

    def consumer_sleeping(self) -> bool:
        return self._u64[_SLEEP] & 1 != 0

    def pop_all(self, decode: Callable[[memoryview], T], out: list[T], limit: int = 1 << 30) -> int:
        """Decode the records published so far (at most ``limit``) into ``out``, in place, and
        consume them. ``decode`` must not keep the view. Returns the number of records."""
        return _pop_all(self, decode, out, limit)

    def drain_into(
        self, decode: Callable[[memoryview], T], out: list[T], limit: int, bell: Callable[[], None]
    ) -> bool:
        """Consumer, woken by its doorbell: say it is awake, clear the doorbell with ``bell()``,
        decode what is published (at most ``limit`` records) into ``out``, and say it goes back
        to sleep. True if it stopped at ``limit`` with records still waiting: it then stays
        awake (producers do not ring) and the caller must ring its own doorbell to come back.

        One frame for the whole wake-up (the front's per-wake-up cost is mostly Python calls).
        Saying "awake" before clearing the doorbell spares the producer a ring, and the
        consumer a wake-up with nothing to read, for records published in between.
        """
        u64 = self._u64
        u64[_SLEEP] = self._naps << 1  # awake
        bell()
        while True:
            limit -= _pop_all(self, decode, out, limit)
            self._naps += 1
            u64[_SLEEP] = self._naps << 1 | 1
            fences.full()  # the flag store must be visible before the counter is read
            if u64[_W] == u64[_R]:
                return False  # asleep with nothing waiting: the next record rings
            u64[_SLEEP] = self._naps << 1
            if limit <= 0:
                return True

    def pop(self, decode: Callable[[memoryview], T]) -> T | None:
        """Decode the next record in place and consume it; None when the ring is empty."""
        out: list[T] = []
        return out[0] if _pop_all(self, decode, out, 1) else None


def _pop_all_py(ring: Ring, decode: Callable[[memoryview], T], out: list[T], limit: int) -> int:
    """Decode every published record into ``out``; returns how many. One load of the write
    counter, one store of the read counter, and a tight loop (this is the front's hot path:
    per record, little but the decode itself). The fallback of :func:`_pop_all_c`."""
    u64, data, cap, mask = ring._u64, ring._data_ro, ring.capacity, ring._mask
    r0 = r = u64[_R]
    w = u64[_W]
    if r == w:
        return 0
    if _ACQUIRE is not None:
        _ACQUIRE()
    if not 0 <= w - r <= cap or r & 7:
        raise _counters_error(ring, r, w)
    unpack, append, data_kind, pad_kind = _FRAME.unpack_from, out.append, KIND_DATA, KIND_PAD
    seq = ring._rseq
    n = 0
    view = None
    try:
        while r != w and n < limit:
            pos = r & mask
            length, kind, fseq = unpack(data, pos)
            body = pos + 8
            size = 8 + ((length + 7) & ~7)
            if pos + size > cap or r + size > w:
                raise _frame_error(ring, r, length, kind)
            if kind == data_kind:
                if fseq != seq & 0xFFFF:
                    raise _sequence_error(ring, seq, fseq)
                view = data[body : body + length]
                append(decode(view))
                view.release()
                seq += 1
                n += 1
            elif kind != pad_kind:
                raise _frame_error(ring, r, length, kind)
            r += size
    finally:
        if view is not None:
            view.release()  # a decode error left it held
        ring._rseq = seq
        if r != r0:
            if _RELEASE is not None:
                _RELEASE()  # done reading before the producer may reuse the space
            u64[_R] = r
    return n


def _pop_all_c(ring: Ring, decode: Callable[[memoryview], T], out: list[T], limit: int) -> int:
    """:func:`_pop_all_py` in C (``ipc._ringscan``): the same checks, counters and errors,
    without the per-record bytecode. On a bad frame the records before it are consumed and
    the read counter points at it, so the error is described from there."""
    n = _ringscan.pop_all(ring, ring._buf, ring._data_ro, decode, out, limit)
    if n >= 0:
        return n
    u64 = ring._u64
    r = u64[_R]
    if n == _ringscan.STATUS_COUNTERS:
        raise _counters_error(ring, r, u64[_W])
    length, kind, fseq = _FRAME.unpack_from(ring._data, r & ring._mask)
    if n == _ringscan.STATUS_SEQUENCE:
        raise _sequence_error(ring, ring._rseq, fseq)
    raise _frame_error(ring, r, length, kind)


def _counters_error(ring: Ring, r: int, w: int) -> RingError:
    return RingError(f"{ring.name}: counters out of range (w={w}, r={r})")


def _frame_error(ring: Ring, r: int, length: int, kind: int) -> RingError:
    return RingError(f"{ring.name}: corrupt frame at {r} (len={length}, kind={kind})")


def _sequence_error(ring: Ring, seq: int, fseq: int) -> RingError:
    return RingError(f"{ring.name}: record {seq} has sequence {fseq} (torn or stale frame)")


# The consumer's scan: C when the extension was built for this layout, else the Python loop.
# (Module-level, looked up at each call, so tests can run both.)
_pop_all = (
    _pop_all_c
    if _ringscan is not None and _ringscan.LAYOUT == (_W * 8, _R * 8, HEADER_SIZE, KIND_DATA, KIND_PAD)
    else _pop_all_py
)


def sweep_orphans(shm_dir: str = "/dev/shm") -> list[str]:
    """Unlink ring names whose owner process is gone (left by a SIGKILLed front)."""
    removed: list[str] = []
    try:
        entries = os.listdir(shm_dir)
    except OSError:
        return removed
    for entry in entries:
        if not entry.startswith(NAME_PREFIX):
            continue
        try:
            pid = int(entry.split(".")[1])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid() or pid_alive(pid):
            continue
        try:
            posix_ipc.unlink_shared_memory("/" + entry)
            removed.append(entry)
        except posix_ipc.ExistentialError:
            pass
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
