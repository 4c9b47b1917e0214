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
from typing import TypeVar

import msgspec

from ipc import records
from ipc.ring import Ring, RingError
from ipc.wakeup import Wakeup

T = TypeVar("T")


@dataclass(frozen=True)
class ChannelSpec:
    req_name: str
    req_nonce: int
    evt_name: str
    evt_nonce: int
    to_engine: Wakeup
    to_front: Wakeup


def _decoder(decoder: msgspec.msgpack.Decoder[T], ring: Ring) -> Callable[[memoryview], T]:
    def decode(view: memoryview) -> T:
        try:
            return decoder.decode(view)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise RingError(f"{ring.name}: undecodable record: {e}") from e

    return decode


class FrontEnd:
    """The front's side: writes requests, reads events."""

    def __init__(self, req: Ring, evt: Ring, to_engine: Wakeup, to_front: Wakeup) -> None:
        self.req, self.evt = req, evt
        self.to_engine, self.to_front = to_engine, to_front
        self._decode = _decoder(records.to_front_decoder, evt)

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
        if not self.req.try_write(records.encode(record)):
            return False
        if self.req.needs_wake():
            self.to_engine.ring()
        return True

    def recv(self) -> records.ToFront | None:
        return self.evt.pop(self._decode)

    def drain(self) -> list[records.ToFront]:
        """Everything the engine has published; call when :meth:`fileno` is readable.

        Raises :class:`~ipc.ring.RingError` if the ring is corrupt (treat as engine death).
        """
        self.to_front.drain()
        evt, decode = self.evt, self._decode
        evt.wake_up()
        out = []
        while True:
            while (record := evt.pop(decode)) is not None:
                out.append(record)
            if evt.prepare_sleep():
                return out

    def has_pending(self) -> bool:
        """Events are waiting (the safety-net timer's question; normally the doorbell says it)."""
        return self.evt.has_data()

    def heartbeat_age(self) -> float:
        return self.evt.heartbeat_age()

    def unlink(self) -> None:
        self.req.unlink()
        self.evt.unlink()

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
        self._decode = _decoder(records.to_engine_decoder, self.req)

    def recv(self) -> records.ToEngine | None:
        return self.req.pop(self._decode)

    def try_send(self, payload: bytes) -> bool:
        """Write one encoded event if there is room now (never waits)."""
        if not self.evt.try_write(payload):
            return False
        if self.evt.needs_wake():
            self.to_front.ring()
        return True

    def max_record(self) -> int:
        return self.evt.max_record()

    def send(self, record: records.ToFront, alive: Callable[[], bool] = lambda: True) -> None:
        """Write one event, waiting for room while the front drains (it always does)."""
        payload = records.encode(record)
        delay = 0.0001
        while not self.evt.try_write(payload):
            if not alive():
                raise RingError("front is gone")
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
        if self.evt.needs_wake():
            self.to_front.ring()

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
        self.req.close()
        self.evt.close()
        self.to_engine.close()
        self.to_front.close()
