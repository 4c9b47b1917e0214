"""The ASGI application: routes, middleware, the error renderer, and the engines' life cycle."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Scope

from axserving.auth import BearerAuthMiddleware
from axserving.config import Settings, from_json
from axserving.engine.client import EngineClient, EngineState, StateListener
from axserving.engine.supervisor import EngineSupervisor
from axserving.errors import (
    APIError,
    MethodNotAllowed,
    NotFound,
    ServiceUnavailable,
    body_for,
)
from axserving.generation import CLIENT_CLOSED
from axserving.logs import setup_logging
from axserving.metrics import Metrics, ModelsCollector, SchedulerCollector
from axserving.middleware import ResponseMiddleware, request_id_middleware
from axserving.models.manager import ClientFactory, ModelManager
from axserving.models.spec import ModelSpec
from axserving.recent import sample_forever
from axserving.routes import routes
from axserving.scheduler import Scheduler
from axserving.shutdown import WorkerShutdown
from axserving.state import AppState, json_response
from ipc.lifetime import die_with_parent
from ipc.ring import sweep_orphans

log = logging.getLogger("axserving")

SETTINGS_ENV = "AXS__RESOLVED_SETTINGS"  # how `axserving run` hands settings to Granian's worker
SOURCES_ENV = "AXS__SETTINGS_SOURCES"  # and where each came from (the start-up report)


def _render(err: APIError, request: Request) -> Response:
    return json_response(body_for(request.url.path, err), status=err.status, headers=err.headers or None)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return _render(exc, request)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return _render(NotFound(f"Unknown route: {request.method} {request.url.path}"), request)
    if exc.status_code == 405:
        return _render(MethodNotAllowed(f"Method {request.method} not allowed on {request.url.path}"), request)
    return _render(APIError(str(exc.detail)), request)


async def _client_gone(request: Request, exc: Exception) -> Response:
    """The client left while sending its body: an ordinary end, not an error."""
    log.debug("client left mid-body on %s %s", request.method, request.url.path)
    return Response(status_code=CLIENT_CLOSED)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _render(APIError("The server had an error while processing your request."), request)


def engine_processes(settings: Settings) -> ClientFactory:
    """The real engine client: a supervised engine process per model (or per reload)."""

    def make(spec: ModelSpec, on_event: StateListener) -> EngineClient:
        return EngineSupervisor(
            spec.id, spec.backend, spec.engine, settings.engine,
            log_level=settings.logging.level.value, log_format=settings.logging.format.value, on_event=on_event,
        )

    return make


def create_app(
    settings: Settings,
    engines: ClientFactory | None = None,
    own_signals: bool = False,
    sources: dict[str, str] | None = None,
    registry: CollectorRegistry | None = None,
) -> Starlette:
    """``engines`` makes each model's engine client (default: engine processes). ``own_signals``
    (in Granian's worker): SIGTERM/SIGINT start the bounded drain of :mod:`axserving.shutdown`.
    ``sources``: where each setting came from (:func:`axserving.config.load_traced`).
    ``registry``: the Prometheus registry the app's metrics go to (default: its own)."""
    metrics = Metrics(registry)

    def on_engine_event(model_id: str, engine_state: EngineState) -> None:
        if engine_state is EngineState.restarting:
            metrics.engine_restarts.labels(model_id).inc()

    manager = ModelManager(settings, engines or engine_processes(settings), on_event=on_engine_event)
    metrics.registry.register(ModelsCollector(manager))
    scheduler = Scheduler(settings.scheduler)
    metrics.registry.register(SchedulerCollector(scheduler))
    state = AppState(settings=settings, models=manager, scheduler=scheduler, metrics=metrics, sources=sources or {})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        sampler: asyncio.Task[None] | None = None
        removed = sweep_orphans()
        if removed:
            log.warning("removed %d shared-memory names left by dead processes", len(removed))
        try:
            await manager.start()
            if own_signals:
                WorkerShutdown(state).install()
            sampler = asyncio.create_task(
                sample_forever(metrics.recent, lambda: (len(scheduler.waiting), scheduler.inflight)),
                name="metrics-timeline",
            )
            names = ", ".join(f"{m.id} ({m.spec.backend})" for m in manager)
            log.info("axserving front pid %d: serving %s", os.getpid(), names or "no model yet")
            yield
        finally:
            if sampler is not None:
                sampler.cancel()
            state.shutting_down = True
            await manager.close()
            log.info("all engines stopped")

    def audit_auth_failure(scope: Scope, err: APIError) -> None:
        client = scope.get("client") or ("", 0)
        state.audit.record("auth.failure", client[0], f"{scope['method']} {scope['path']}", f"{err.status}", err.message)

    table = routes()
    app = Starlette(
        routes=table,
        middleware=[
            Middleware(request_id_middleware),
            Middleware(ResponseMiddleware, counter=metrics.requests, routes=table),
            Middleware(BearerAuthMiddleware, keys=settings.api_keys, on_failure=audit_auth_failure),
        ],
        exception_handlers={
            APIError: _api_error,
            HTTPException: _http_error,
            ClientDisconnect: _client_gone,
            Exception: _unexpected,
        },
        lifespan=lifespan,
    )
    app.state.axs = state
    return app


def create_app_from_env() -> Starlette:
    """Factory for Granian's worker: settings were validated by the CLI and passed as JSON."""
    raw = os.environ.get(SETTINGS_ENV)
    if raw is None:
        raise ServiceUnavailable(f"{SETTINGS_ENV} is not set; start the server with `axserving run`")
    settings = from_json(raw)
    setup_logging(settings.logging)
    # Granian's main process gone (even SIGKILLed): this worker shuts down in order, its
    # engines with it, rather than serve the port as an orphan beside a new server.
    die_with_parent(signal.SIGTERM)
    sources = json.loads(os.environ.get(SOURCES_ENV) or "{}")
    return create_app(settings, own_signals=True, sources=sources)
