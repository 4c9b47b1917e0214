"""Processes that must not outlive their parent: the front's worker (Granian's main process
is its parent) and the engines (the worker is theirs)."""

from __future__ import annotations

import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies (a no-op elsewhere).

    The signal comes when the parent's *thread* that started us exits: call this only in a
    process started from a thread that lives as long as its process (a main thread, or a
    thread pool's worker, which never exits while its loop runs)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig)) == 0
    except (OSError, AttributeError):
        return False
