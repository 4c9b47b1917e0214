"""Health, probes, metrics and admin status.

``/health``, ``/livez``, ``/readyz`` and ``/metrics`` are open (orchestrators, scrapers): they
say each model's state and load, never a path, a pid or an error text. Those are on the
authenticated routes (``/v1/models``, ``/v1/admin/status``).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from axserving import __version__
from axserving.audit import RING
from axserving.auth import OPEN_PATHS
from axserving.config import settings_report
from axserving.errors import InvalidRequest
from axserving.metrics import EngineFigures, front_rss
from axserving.recent import TICK_S
from axserving.scheduler import Priority
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


def metrics_body(state: AppState) -> dict[str, Any]:
    """``GET /v1/metrics``: what ``/metrics`` says, as JSON with percentiles over the last
    minutes (AX Serving's keys: ``*_us`` with p50/p95/p99), per model and overall, the
    timeline the dashboard draws, and the newest audit events (without who or why: the route
    is open)."""
    recent = state.metrics.recent
    sched = state.scheduler
    models = []
    for m in state.models:
        snap = m.engine.client.snapshot()
        e = EngineFigures.of(snap)
        models.append({
            "id": m.id,
            "state": m.state.value,
            "backend": m.spec.backend,
            "running": e.running,
            "waiting": e.waiting,
            "max_batch": e.max_batch,
            "batch_occupancy": round(e.batch_occupancy, 4),
            "kv_cache_usage": round(e.kv_usage, 4),
            "restarts": snap.get("restarts", 0),
            "preemptions": e.preemptions,
            "rss_bytes": e.rss_bytes,
            "memory_bytes": m.spec.memory_bytes,
            "latency": recent.summary(m.id),
        })
    return {
        "object": "metrics",
        "version": __version__,
        "uptime_secs": int(time.monotonic() - state.started),
        "scheduler": {
            "queue_depth": len(sched.waiting),
            "inflight_count": sched.inflight,
            "limit": sched.limit,
            "rejected_requests": sched.rejected,
            "shed_requests": sched.shed,
            "queue_timeouts": sched.timed_out,
        },
        "totals": {
            "requests": recent.ended,
            "generation_tokens": recent.generated,
            "loaded_models": len(state.models),
        },
        "rss_bytes": front_rss(),
        "engines_rss_bytes": sum(m["rss_bytes"] for m in models),
        "latency": recent.summary(),
        "models": models,
        "timeline": recent.points(),
        "tick_secs": TICK_S,
        "events": [
            {k: e[k] for k in ("ts", "action", "target", "outcome")} for e in state.audit.tail(20)
        ],
    }


async def metrics_json(request: Request) -> Response:
    return json_response(metrics_body(app_state(request)))


async def admin_startup_report(request: Request) -> Response:
    """The effective configuration, one row per key with its source (flag, env, file or
    default; secrets masked), and the models as resolved at start."""
    state = app_state(request)
    rows = settings_report(state.settings, state.sources)
    by_source: dict[str, int] = {}
    for row in rows:
        by_source[row["source"]] = by_source.get(row["source"], 0) + 1
    return json_response({
        "version": __version__,
        "pid": os.getpid(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_total_bytes": memory.physical_memory(),
        "precedence": ["flag", "env", "file", "default"],
        "sources": by_source,
        "settings": rows,
        "models": [model.describe(private=True) for model in state.models],
    })


async def admin_diagnostics(request: Request) -> Response:
    """One document to attach to a bug report: health, metrics, models and their engines,
    the scheduler, and the audit tail."""
    state = app_state(request)
    return json_response({
        "version": __version__,
        "health": health_body(state),
        "metrics": metrics_body(state),
        "models": [model.describe(private=True) for model in state.models],
        "engines": {model.id: model.engine.client.snapshot() for model in state.models},
        "audit": state.audit.tail(50),
    })


async def admin_policy(request: Request) -> Response:
    """The policies in force: authentication, admission and overload, model lifecycle."""
    s = app_state(request).settings
    manager = app_state(request).models
    return json_response({
        "auth": {
            "required": bool(s.api_keys),
            "keys": len(s.api_keys),
            "schemes": ["Authorization: Bearer KEY", "x-api-key: KEY"],
            "open_routes": sorted(OPEN_PATHS),
        },
        "admission": {
            "overload_policy": s.scheduler.overload_policy.value,
            "max_inflight": s.scheduler.max_inflight,
            "max_queue": s.scheduler.max_queue,
            "max_wait_ms": s.scheduler.max_wait_ms,
            "per_model_max_inflight": s.scheduler.per_model_max_inflight,
            "engine_lookahead": s.scheduler.engine_lookahead,
            "aging_ms": s.scheduler.aging_ms,
            "target_p99_ms": s.scheduler.target_p99_ms,
            "priorities": [p.name for p in Priority],
            "fairness": "round robin between clients (bearer key or peer address) within a priority",
            "request_timeout_secs": s.scheduler.request_timeout_secs,
            "default_max_tokens": s.scheduler.default_max_tokens,
        },
        "lifecycle": {
            "max_loaded_models": s.lifecycle.max_loaded_models,
            "memory_budget_bytes": manager.memory_budget,
            "eviction": "least recently used unpinned model when a load needs room (count or memory); "
                        "idle models after their idle_timeout_secs",
            "allowed_dirs": list(s.lifecycle.allowed_dirs),
            "runtime_loads": "anywhere" if not s.lifecycle.allowed_dirs else "under allowed_dirs only",
            "drain_timeout_secs": s.lifecycle.drain_timeout_secs,
        },
        "engines": {
            "max_restarts": s.engine.max_restarts,
            "restart_backoff_ms": s.engine.restart_backoff_ms,
            "restart_backoff_max_ms": s.engine.restart_backoff_max_ms,
            "circuit_cooldown_secs": s.engine.circuit_cooldown_secs,
            "heartbeat_timeout_secs": s.engine.heartbeat_timeout_secs,
        },
        "limits": {"max_body_bytes": s.rest.max_body_bytes, "body_timeout_secs": s.rest.body_timeout_secs},
    })


async def license_info(request: Request) -> Response:
    """``GET /v1/license``, for parity with AX Serving's editions: this is the open-source
    server; every feature is on and no key is needed."""
    return json_response({
        "edition": "open_source",
        "licensed": True,
        "key_required": False,
        "expires_at": None,
        "features": ["multi_model", "scheduler", "structured_output", "tools", "embeddings", "responses",
                     "messages", "metrics", "dashboard", "admin"],
    })


async def license_activate(request: Request) -> Response:
    raise InvalidRequest("this is the open-source edition: it needs no license key", code="license_not_required")


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
