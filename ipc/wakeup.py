"""A doorbell between two processes: eventfd on Linux, a non-blocking pipe elsewhere.

The producer rings after publishing a record; the consumer waits on :meth:`fileno` (with
``loop.add_reader`` in the front, ``select`` in the engine), drains the bell, then drains the ring.
Draining the bell *before* the ring means a record published after the drain rings again, so no
wake-up is lost.

Instances pickle into a ``spawn`` child by handing the file descriptors over with
``multiprocessing.reduction.DupFd`` (the same mechanism ``multiprocessing.Connection`` uses).
"""

from __future__ import annotations

import os
from multiprocessing import reduction
from typing import Any

_HAVE_EVENTFD = hasattr(os, "eventfd")


class Wakeup:
    def __init__(self, rfd: int | None = None, wfd: int | None = None) -> None:
        if rfd is not None and wfd is not None:
            self._rfd, self._wfd = rfd, wfd
        elif _HAVE_EVENTFD:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._rfd = self._wfd = fd
        else:
            self._rfd, self._wfd = os.pipe()
            os.set_blocking(self._rfd, False)
            os.set_blocking(self._wfd, False)
        self._closed = False

    def fileno(self) -> int:
        return self._rfd

    def ring(self) -> None:
        try:
            if _HAVE_EVENTFD:
                os.eventfd_write(self._wfd, 1)
            else:
                os.write(self._wfd, b"\x01")
        except BlockingIOError:
            pass  # already rung and not yet drained: the reader will wake anyway

    def drain(self) -> None:
        try:
            if _HAVE_EVENTFD:
                os.eventfd_read(self._rfd)
            else:
                while os.read(self._rfd, 4096):
                    pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.close(self._rfd)
        if self._wfd != self._rfd:
            os.close(self._wfd)

    def __reduce__(self) -> tuple[Any, ...]:
        if self._wfd == self._rfd:
            return (_rebuild, (reduction.DupFd(self._rfd), None))
        return (_rebuild, (reduction.DupFd(self._rfd), reduction.DupFd(self._wfd)))


def _rebuild(rfd: Any, wfd: Any) -> Wakeup:
    r = rfd.detach()
    w = wfd.detach() if wfd is not None else r
    return Wakeup(r, w)
