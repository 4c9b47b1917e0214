"""Models list, health, probes, metrics and admin status."""

from __future__ import annotations

import os
import time

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from axserving import __version__
from axserving.engine.supervisor import EngineState
from axserving.state import AppState, app_state, json_response


async def list_models(request: Request) -> Response:
    state = app_state(request)
    data = [
        {"id": m.id, "object": "model", "created": m.created, "owned_by": "axserving"}
        for m in state.registry
    ]
    return json_response({"object": "list", "data": data})


def _models(state: AppState) -> list[dict[str, object]]:
    return [
        {"id": m.id, "backend": m.backend, "path": m.path, "engine": m.supervisor.snapshot()}
        for m in state.registry
    ]


def health_body(state: AppState) -> dict[str, object]:
    ready = state.registry.any_ready() and not state.shutting_down
    body: dict[str, object] = {
        "status": "ok" if ready else "degraded",
        "ready": ready,
        "model_available": state.registry.any_ready(),
        "loaded_models": [m.id for m in state.registry],
        "loaded_model_count": len(state.registry),
        "uptime_secs": int(time.monotonic() - state.started),
        "models": _models(state),
    }
    if not ready:
        if state.shutting_down:
            body["reason"] = "shutting down"
        elif not len(state.registry):
            body["reason"] = "no model loaded"
        else:
            states = ", ".join(f"{m.id}: {m.supervisor.state.value}" for m in state.registry)
            body["reason"] = f"no model can serve ({states})"
    return body


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
    state = app_state(request)
    m = state.metrics
    for entry in state.registry:
        m.engine_up.labels(entry.id).set(1 if entry.supervisor.state is EngineState.ready else 0)
        snap = entry.supervisor.snapshot()
        m.engine_running.labels(entry.id).set(snap["running"])  # type: ignore[arg-type]
        m.engine_waiting.labels(entry.id).set(snap["waiting"])  # type: ignore[arg-type]
        m.engine_preemptions.labels(entry.id).set(snap["preemptions"])  # type: ignore[arg-type]
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)


async def admin_status(request: Request) -> Response:
    state = app_state(request)
    return json_response(
        {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_secs": int(time.monotonic() - state.started),
            "inflight": state.admitted,
            "models": _models(state),
        }
    )
