"""The seam between the engine loop and a model runtime.

A backend is driven by one thread in the engine process: the loop ``submit``s requests as they
arrive, calls ``step`` while ``has_work`` is true, and ``abort``s requests the front cancelled.
``step`` advances every running sequence by (at most) one token and returns one
:class:`~ipc.records.Delta` per sequence that made progress or finished. A backend may run one
sequence at a time and keep the others waiting; the loop does not care.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine_proc.spec import BackendConfig
from ipc.records import Delta, FailCode, Submit

if TYPE_CHECKING:
    from engine_proc.tokenizer import Tokenizer

__all__ = ["Backend", "BackendConfig", "ModelInfo", "RequestRejected"]


def _never(rid: int) -> bool:
    return False


@dataclass(frozen=True, slots=True)
class ModelInfo:
    backend: str
    n_ctx: int
    description: str = ""
    step_s: float = 0.0  # how long a full step takes (measured at load; 0: unknown)


class RequestRejected(Exception):
    """A request the backend refuses; the engine reports it to the front and carries on."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = FailCode(code)
        self.message = message
        self.param = param  # the request field at fault, if one is


class Backend(abc.ABC):
    name: str = "backend"

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        # Set by the engine loop: has the front cancelled this request? Check it before work
        # that takes long (the next prefill chunk) and drop the request at once if so. (A step
        # is bounded, one llama_decode of at most n_batch tokens, and the loop beats the
        # heartbeat between steps.)
        self.cancelled: Callable[[int], bool] = _never
        # Requests the backend dropped by itself (their cancel bit was seen before their Abort):
        # the loop tells the front about each, so that none is ever dropped silently.
        self.dropped: list[int] = []

    @abc.abstractmethod
    def load(self) -> ModelInfo:
        """Load the model. Raise on failure; the engine reports it as fatal."""

    @abc.abstractmethod
    def submit(self, request: Submit) -> None:
        """Accept a request, or raise :class:`RequestRejected` (bad prompt, too long, ...)."""

    @abc.abstractmethod
    def step(self) -> list[Delta]:
        """Advance running sequences by one step; return their deltas (finished ones included)."""

    @abc.abstractmethod
    def abort(self, rid: int) -> None:
        """Drop a request and free what it holds. Unknown ids are ignored."""

    @abc.abstractmethod
    def has_work(self) -> bool:
        """True while any request is waiting or running."""

    #: Sequences preempted since load because the KV cache was full (their tokens are
    #: recomputed when they run again). Backends without a bounded cache leave it at 0.
    preemptions: int = 0
    #: Prompt tokens computed since load (prompt tokens reused from the KV cache are not).
    prefill_tokens: int = 0
    #: Prompt-lookup drafting since load: tokens drafted, and of them those kept (see
    #: engine_proc.backends.lookup). Backends that do not draft leave them at 0.
    drafted_tokens: int = 0
    kept_tokens: int = 0
    #: The vocabulary and chat template, once loaded (utility requests are answered from it).
    tokenizer: Tokenizer | None = None

    def trusted_messages(self) -> bool:
        """Message text may carry special tokens (the ``special_tokens_in_messages=1`` option)."""
        return self.config.option("special_tokens_in_messages") == "1"

    def native_heartbeat(self, callback: int, address: int) -> bool:
        """Install ``callback`` (a C ``bool (*)(void *)``, see ``ipc/_fence.c``) for the runtime to
        call with ``address`` while it computes, so the heartbeat beats inside long native calls;
        True if the backend can. Without it the loop beats between steps only, and the front's
        hang limit follows the step times the loop reports."""
        return False

    def occupancy(self) -> tuple[int, int]:
        """(running, waiting) sequences, for the engine's stats."""
        return (1 if self.has_work() else 0), 0

    def kv_usage(self) -> float:
        """The fraction (0..1) of the KV cache held by running sequences (cached prefixes that
        a new request may take over are free), for the engine's stats."""
        return 0.0

    def close(self) -> None:
        """Release the model. Called once, before the engine process exits."""
