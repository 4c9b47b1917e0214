"""The audit trail: who changed what, and who was refused. A bounded ring in the front's memory
(``GET /v1/admin/audit?limit=N``), each event also logged at INFO.

Events: model load, unload and reload (with the caller and the outcome), and authentication
failures. The caller is identified as the scheduler's fairness does: a hash of the bearer key, or
the peer address when none was sent; keys themselves are never kept.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from asgi_correlation_id import correlation_id

log = logging.getLogger("axserving.audit")

RING = 1000


@dataclass(frozen=True, slots=True)
class Event:
    ts: float  # unix time
    action: str  # model.load, model.unload, model.reload, auth.failure
    actor: str
    target: str
    outcome: str  # ok, or the error's HTTP status and code
    detail: str = ""
    request_id: str = ""


class AuditLog:
    def __init__(self, size: int = RING) -> None:
        self._events: deque[Event] = deque(maxlen=size)

    def record(self, action: str, actor: str, target: str, outcome: str, detail: str = "") -> Event:
        event = Event(time.time(), action, actor, target, outcome, detail, correlation_id.get() or "")
        self._events.append(event)
        log.info("audit %s %s by %s: %s %s", action, target, actor, outcome, detail)
        return event

    def tail(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` events, oldest first."""
        events = list(self._events)[-limit:] if limit > 0 else []
        return [asdict(e) for e in events]

    def __len__(self) -> int:
        return len(self._events)
