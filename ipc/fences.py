"""Memory fences for the rings, chosen by platform.

``full`` orders a store before a later load; the sleep/wake handshake needs it on every platform.
``release`` / ``acquire`` order payload bytes against the counters that publish them: free on
x86 (its stores are not reordered with stores, nor loads with loads), real instructions on ARM.
They come from the tiny C helper ``ipc._fence``. Without it, ``HANDSHAKE`` is False and writers
ring the doorbell after every record instead (correct, just more system calls); on a weakly
ordered CPU the rings cannot run without it at all.
"""

from __future__ import annotations

import platform
from collections.abc import Callable

try:
    from ipc import _fence
except ImportError:  # the optional extension was not built
    _fence = None  # type: ignore[assignment]  # noqa: F811

WEAKLY_ORDERED = platform.machine().lower().startswith(("arm", "aarch64"))
HANDSHAKE = _fence is not None


def _none() -> None:
    pass


if _fence is None and WEAKLY_ORDERED:
    raise ImportError("ipc._fence (a C extension) is required on ARM: reinstall axserving with a C compiler")

def native_heartbeat() -> int | None:
    """Address of a C heartbeat callback (see ``ipc/_fence.c``), or None without the extension."""
    return _fence.heartbeat_callback() if _fence is not None else None


full: Callable[[], None] = _fence.full if _fence is not None else _none
release: Callable[[], None] = _fence.release if (_fence is not None and WEAKLY_ORDERED) else _none
acquire: Callable[[], None] = _fence.acquire if (_fence is not None and WEAKLY_ORDERED) else _none
