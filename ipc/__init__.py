"""Shared-memory rings, wake-ups and record types between the front and its engines."""

from ipc.channel import ChannelSpec, EngineEnd, FrontEnd
from ipc.ring import Ring, RingError, sweep_orphans
from ipc.wakeup import Wakeup

__all__ = [
    "ChannelSpec",
    "EngineEnd",
    "FrontEnd",
    "Ring",
    "RingError",
    "Wakeup",
    "sweep_orphans",
]
