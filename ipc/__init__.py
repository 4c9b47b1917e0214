"""Shared-memory rings, wake-ups and record types between the front and its engines."""

from ipc.channel import ChannelSpec, EngineEnd, FrontEnd
from ipc.ring import Ring, RingError, RingFull, sweep_orphans
from ipc.wakeup import Wakeup

__all__ = [
    "ChannelSpec",
    "EngineEnd",
    "FrontEnd",
    "Ring",
    "RingError",
    "RingFull",
    "Wakeup",
    "sweep_orphans",
]
