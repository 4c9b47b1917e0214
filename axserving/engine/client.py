"""The one interface the front has to an engine: what the model manager, the routes and (next)
the scheduler use, so that each can be tested against an in-process client
(:class:`axserving.engine.inproc.InprocEngineClient`) as well as the real one
(:class:`axserving.engine.supervisor.EngineSupervisor`: an engine process behind
shared-memory rings, restarted when it dies).
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable
from typing import Any

from axserving.engine.stream import RequestStream
from ipc import records


class EngineState(str, enum.Enum):
    loading = "loading"
    ready = "ready"
    restarting = "restarting"
    failed = "failed"
    stopped = "stopped"


#: Called on every state change with (model id, new state).
StateListener = Callable[[str, EngineState], None]


class EngineClient(abc.ABC):
    model_id: str
    state: EngineState
    last_error: str | None

    @abc.abstractmethod
    def start(self) -> None:
        """Begin starting the engine (returns at once; :meth:`started` says how it went)."""

    @abc.abstractmethod
    async def started(self) -> None:
        """Return once the first engine is ready; raise :class:`EngineUnavailable` if that
        first start failed (a later restart is the supervisor's business, not the caller's)."""

    @abc.abstractmethod
    async def submit(
        self, build: Callable[[int], records.Submit], ready_by: float, deadline: float
    ) -> RequestStream:
        """Send a request; its output stream. Waits through a (re)start until ``ready_by``;
        past ``deadline`` the request is aborted (``RequestTimeout``)."""

    @property
    @abc.abstractmethod
    def inflight(self) -> int:
        """Requests submitted and not finished."""

    @abc.abstractmethod
    def snapshot(self) -> dict[str, Any]:
        """State and counters, for status routes and metrics."""

    def stale(self) -> bool:
        """The running engine's heartbeat is late (a hang is suspected)."""
        return False

    def stopping(self) -> None:
        """Shutdown has begun: an engine that dies from now on is not restarted."""

    @abc.abstractmethod
    async def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine (killing it after ``timeout``); requests still running fail."""
