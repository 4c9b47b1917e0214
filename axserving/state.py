"""What the running front holds: settings, models, metrics. One instance per app."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from axserving.audit import AuditLog
from axserving.config import Settings
from axserving.metrics import Metrics
from axserving.models.manager import ModelManager
from axserving.scheduler import Scheduler


@dataclass
class AppState:
    settings: Settings
    models: ModelManager
    scheduler: Scheduler
    metrics: Metrics = field(default_factory=Metrics)
    audit: AuditLog = field(default_factory=AuditLog)
    sources: dict[str, str] = field(default_factory=dict)  # where each setting came from
    started: float = field(default_factory=time.monotonic)
    admitted: int = 0  # requests between admission and their final byte
    shutting_down: bool = False


def app_state(request: Request) -> AppState:
    return request.app.state.axs  # type: ignore[no-any-return]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # OPT_SERIALIZE_NUMPY: embeddings are float32 arrays, written without a Python float each.
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status, headers=headers,
                    media_type="application/json")
