"""An orderly, bounded stop of the front's worker.

On SIGTERM (or SIGINT): ``/readyz`` answers 503 at once and new requests get a 503; requests in
flight get up to ``lifecycle.drain_timeout_secs`` to finish; then the engines are stopped, so
whatever is still streaming ends with an error frame and ``[DONE]``; every shared-memory name
is unlinked; the worker exits 0. A second interrupt of ``axserving run`` reaches the worker as
:data:`FORCE_SIGNAL` and ends it at once.

The worker's signal handlers are ours from the lifespan's start: Granian's own would wait for
every connection, however long (a 50 s stream held a shutdown 49.7 s). The main process's
``workers_kill_timeout`` (set by the CLI beyond the drain timeout) stays as a backstop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

from axserving.state import AppState

log = logging.getLogger("axserving.shutdown")

FORCE_SIGNAL = signal.SIGUSR2
FLUSH_S = 2.0  # after the engines stop: time for the error frames to reach the clients
FORCE_STOP_S = 0.5
WIRE_S = 0.3


class WorkerShutdown:
    def __init__(self, state: AppState) -> None:
        self.state = state
        self._task: asyncio.Task[None] | None = None

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.begin, sig)
        loop.add_signal_handler(FORCE_SIGNAL, self.force)

    def begin(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Idempotent: the main process forwards the signal the worker may have had already."""
        if self._task is not None:
            return
        log.info("%s: draining (up to %gs), then stopping", signal.Signals(sig).name,
                 self.state.settings.lifecycle.drain_timeout_secs)
        self.state.shutting_down = True
        self._task = asyncio.ensure_future(self._drain_and_exit())

    async def _drain_and_exit(self) -> None:
        state = self.state
        try:
            deadline = time.monotonic() + state.settings.lifecycle.drain_timeout_secs
            while state.admitted and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if state.admitted:
                log.warning("drain timeout: %d requests still running; their engines stop now", state.admitted)
            await state.models.close()
            flush_by = time.monotonic() + FLUSH_S
            while state.admitted and time.monotonic() < flush_by:
                await asyncio.sleep(0.02)
            # The last bytes are handed to Granian's threads; give them a moment on the wire.
            await asyncio.sleep(WIRE_S)
            log.info("all engines stopped; exiting")
        except BaseException:
            log.exception("the orderly stop failed; exiting anyway")
        finally:
            _exit(0)

    def force(self) -> None:
        log.warning("second interrupt: stopping now")
        self.state.shutting_down = True

        async def stop_now() -> None:
            try:
                await asyncio.wait_for(self.state.models.close(), FORCE_STOP_S)
            except BaseException:
                log.warning("engines not stopped within %gs; they die with this process", FORCE_STOP_S)
            _exit(0)

        asyncio.ensure_future(stop_now())


def _exit(code: int) -> None:
    logging.shutdown()
    os._exit(code)
