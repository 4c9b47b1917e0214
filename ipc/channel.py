"""A ring pair plus doorbells: the whole link between the front and one engine process.

The front creates the channel (:class:`FrontEnd`) and passes a :class:`ChannelSpec` to the
engine it spawns; the engine attaches (:class:`EngineEnd`) and unlinks the names at once, so
nothing is left in /dev/shm whatever happens to either process afterwards. The front unlinks
them too on every path where the engine never attached.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from ipc import records
from ipc.blob import blob_exists, read_blob, unlink_blob, write_blob
from ipc.ring import Ring, RingError
from ipc.wakeup import Wakeup



class _Link:
    """One direction: a ring, its doorbell, and the blobs written through it."""

    def __init__(self, ring: Ring, bell: Wakeup, decoder: msgspec.msgpack.Decoder[Any]) -> None:
        self.ring = ring
        self.bell = bell
        self._decode = decoder.decode
        self.blobs: list[str] = []  # blob names written and maybe not yet read

    def try_write(self, payload: bytes) -> bool:
        ring = self.ring
        if len(payload) > ring._max_record:
            if ring.free_space() < 256:
                return False  # no room for the reference either: don't build the blob yet
            name, nonce = write_blob(payload)
            if not ring.try_write(records.encode(records.Blob(name, nonce, len(payload)))):
                unlink_blob(name)
                return False
            # The reader unlinks it once read; the list covers a reader that died first.
            self.blobs.append(name)
            if len(self.blobs) > 64:
                self.blobs = [n for n in self.blobs if blob_exists(n)]
        elif not ring.try_write(payload):
            return False
        if ring.needs_wake():
            self.bell.ring()
        return True

    def read(self) -> Any:
        out: list[Any] = []
        return out[0] if self.read_all(out, 1) else None

    def drain_into(self, out: list[Any], limit: int) -> bool:
        """Consumer woken by the doorbell: :meth:`Ring.drain_into` plus blob references
        resolved; True if records are still waiting (the caller rings its own doorbell)."""
        try:
            more = self.ring.drain_into(self._decode, out, limit, self.bell.drain)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise RingError(f"{self.ring.name}: undecodable record: {e}") from e
        blob = records.Blob
        for i, record in enumerate(out):
            if type(record) is blob:
                self._resolve(out, i, record)
        return more

    def _resolve(self, out: list[Any], i: int, ref: records.Blob) -> None:
        try:
            out[i] = read_blob(ref.name, ref.nonce, ref.size, self._decode)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise RingError(f"{self.ring.name}: undecodable record: {e}") from e
        finally:
            unlink_blob(ref.name)

    def read_all(self, out: list[Any], limit: int = 1 << 30) -> int:
        """Append published records (at most ``limit``) to ``out``, blob references resolved."""
        start = len(out)
        try:
            n = self.ring.pop_all(self._decode, out, limit)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise RingError(f"{self.ring.name}: undecodable record: {e}") from e
        for i in range(start, start + n):
            record = out[i]
            if type(record) is records.Blob:
                self._resolve(out, i, record)
        return n

    def unlink_blobs(self) -> None:
        for name in self.blobs:
            unlink_blob(name)
        self.blobs.clear()


@dataclass(frozen=True)
class ChannelSpec:
    req_name: str
    req_nonce: int
    evt_name: str
    evt_nonce: int
    to_engine: Wakeup
    to_front: Wakeup


class FrontEnd:
    """The front's side: writes requests, reads events."""

    def __init__(self, req: Ring, evt: Ring, to_engine: Wakeup, to_front: Wakeup) -> None:
        self.req, self.evt = req, evt
        self.to_engine, self.to_front = to_engine, to_front
        self._out = _Link(req, to_engine, records.to_engine_decoder)
        self._in = _Link(evt, to_front, records.to_front_decoder)

    @classmethod
    def create(cls, req_capacity: int, evt_capacity: int) -> FrontEnd:
        req = Ring.create("req", req_capacity)
        try:
            evt = Ring.create("evt", evt_capacity)
        except BaseException:
            req.unlink()
            req.close()
            raise
        return cls(req, evt, Wakeup(), Wakeup())

    @property
    def spec(self) -> ChannelSpec:
        return ChannelSpec(
            self.req.name, self.req.nonce, self.evt.name, self.evt.nonce, self.to_engine, self.to_front
        )

    def fileno(self) -> int:
        """Readable when the engine has published events."""
        return self.to_front.fileno()

    def try_send(self, record: records.ToEngine) -> bool:
        """Write one request if there is room now (never waits)."""
        return self._out.try_write(records.encode(record))

    def cancel(self, rid: int) -> None:
        """Flag ``rid`` cancelled where the engine looks between prefill chunks (the Abort record
        follows through the ring; the flag only makes a long prefill stop sooner)."""
        self.req.set_flag(rid, True)

    def reuse_slot(self, rid: int) -> None:
        """Clear ``rid``'s cancel bit before its Submit (its slot served rid - 4096 before)."""
        self.req.set_flag(rid, False)

    def drain(self, limit: int = 1024) -> list[records.ToFront]:
        """What the engine has published, at most ``limit`` records; call when :meth:`fileno`
        is readable. If the limit was reached with more waiting, the doorbell is rung again
        here, so the loop comes back to this channel after serving everything else that is
        ready: one busy engine cannot hold the event loop, and the caller need do nothing.

        Raises :class:`~ipc.ring.RingError` if the ring is corrupt (treat as engine death).
        """
        out: list[records.ToFront] = []
        if self._in.drain_into(out, limit):
            self.to_front.ring()
        return out

    def has_pending(self) -> bool:
        """Events are waiting (the safety-net timer's question; normally the doorbell says it)."""
        return self.evt.has_data()

    def heartbeat_age(self) -> float:
        return self.evt.heartbeat_age()

    def unlink(self) -> None:
        self.req.unlink()
        self.evt.unlink()
        self._out.unlink_blobs()

    def close(self) -> None:
        self.unlink()
        self.req.close()
        self.evt.close()
        self.to_engine.close()
        self.to_front.close()


class EngineEnd:
    """The engine's side: reads requests, writes events."""

    def __init__(self, spec: ChannelSpec) -> None:
        self.req = Ring.attach(spec.req_name, spec.req_nonce)
        try:
            self.evt = Ring.attach(spec.evt_name, spec.evt_nonce)
        except BaseException:
            self.req.close()
            raise
        self.req.unlink()
        self.evt.unlink()
        self.to_engine, self.to_front = spec.to_engine, spec.to_front
        self._in = _Link(self.req, self.to_engine, records.to_engine_decoder)
        self._out = _Link(self.evt, self.to_front, records.to_front_decoder)

    def recv(self) -> records.ToEngine | None:
        return self._in.read()  # type: ignore[no-any-return]

    def cancelled(self, rid: int) -> bool:
        """Has the front flagged ``rid`` cancelled? (Cheap: one byte read.)"""
        return self.req.flag(rid)

    def try_send(self, payload: bytes) -> bool:
        """Write one encoded event if there is room now (never waits)."""
        return self._out.try_write(payload)

    def max_record(self) -> int:
        return self.evt.max_record()

    def send(self, record: records.ToFront, alive: Callable[[], bool] = lambda: True) -> None:
        """Write one event, waiting for room while the front drains (it always does)."""
        payload = records.encode(record)
        delay = 0.0001
        while not self._out.try_write(payload):
            if not alive():
                raise RingError("front is gone")
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def heartbeat_address(self) -> int:
        return self.evt.heartbeat_address()

    def beat(self) -> None:
        """Tell the front this engine is alive (cheap: call it every step)."""
        self.evt.beat()

    def wait(self, timeout: float) -> None:
        """Sleep until the front rings or ``timeout`` passes (returns early if data is waiting)."""
        self.to_engine.drain()
        if not self.req.prepare_sleep():
            return
        select.select([self.to_engine.fileno()], [], [], timeout)
        self.req.wake_up()

    def close(self) -> None:
        self._out.unlink_blobs()
        self.req.close()
        self.evt.close()
        self.to_engine.close()
        self.to_front.close()
