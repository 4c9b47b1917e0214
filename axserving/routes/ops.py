"""Health, probes, metrics and admin status.

``/health``, ``/livez``, ``/readyz`` and ``/metrics`` are open (orchestrators, scrapers): they
say each model's state and load, never a path, a pid or an error text. Those are on the
authenticated routes (``/v1/models``, ``/v1/admin/status``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from axserving import __version__
from axserving.audit import RING
from axserving.errors import InvalidRequest
from axserving.models import memory
from axserving.state import AppState, app_state, json_response


def _public(state: AppState) -> list[dict[str, Any]]:
    out = []
    for m in state.models:
        snap = m.engine.client.snapshot()
        out.append({
            "id": m.id,
            "state": m.state.value,
            "aliases": list(m.spec.aliases),
            "running": snap.get("running", 0),
            "waiting": snap.get("waiting", 0),
            "restarts": snap.get("restarts", 0),
        })
    return out


def health_body(state: AppState) -> dict[str, object]:
    available = state.models.any_ready()
    ready = available and not state.shutting_down
    body: dict[str, object] = {
        "status": "ok" if ready else "degraded",
        "ready": ready,
        "model_available": available,
        "loaded_models": [m.id for m in state.models],
        "loaded_model_count": len(state.models),
        "uptime_secs": int(time.monotonic() - state.started),
        "models": _public(state),
    }
    if not ready:
        if state.shutting_down:
            body["reason"] = "shutting down"
        elif not len(state.models):
            body["reason"] = "no model loaded"
        else:
            states = ", ".join(f"{m.id}: {m.state.value}" for m in state.models)
            body["reason"] = f"no model can serve ({states})"
    return body


async def openapi(request: Request) -> Response:
    from axserving.openapi import document

    return json_response(document())


async def health(request: Request) -> Response:
    return json_response(health_body(app_state(request)))


async def livez(request: Request) -> Response:
    return json_response({"status": "alive"})


async def readyz(request: Request) -> Response:
    body = health_body(app_state(request))
    return json_response(
        {"ready": body["ready"], "reason": body.get("reason")}, status=200 if body["ready"] else 503
    )


async def metrics(request: Request) -> Response:
    return Response(generate_latest(app_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def admin_audit(request: Request) -> Response:
    """``GET /v1/admin/audit?limit=N``: the newest N events (default 100, at most the ring's 1000)."""
    raw = request.query_params.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= RING:
        raise InvalidRequest(f"'limit' must be an integer from 1 to {RING}, got {raw!r}", param="limit")
    audit = app_state(request).audit
    return json_response({"object": "list", "data": audit.tail(int(raw)), "total": len(audit)})


async def admin_status(request: Request) -> Response:
    state = app_state(request)
    manager = state.models
    return json_response(
        {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_secs": int(time.monotonic() - state.started),
            "inflight": state.admitted,
            "scheduler": {
                "running": state.scheduler.inflight,
                "waiting": len(state.scheduler.waiting),
                "limit": state.scheduler.limit,
                "rejected": state.scheduler.rejected,
                "shed": state.scheduler.shed,
                "queue_timeouts": state.scheduler.timed_out,
            },
            "default_model": manager.default_model,
            "memory": {
                "budget_bytes": manager.memory_budget,
                "used_bytes": manager.memory_used,
                "budget": memory.fmt(manager.memory_budget),
                "used": memory.fmt(manager.memory_used),
            },
            "evictions": {r.value: n for r, n in manager.evictions.items()},
            "models": [model.describe(private=True) for model in manager],
        }
    )
