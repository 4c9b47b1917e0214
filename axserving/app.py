"""The ASGI application: routes, middleware, the error renderer, and the engines' life cycle."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from axserving.auth import BearerAuthMiddleware
from axserving.config import Settings, from_json
from axserving.engine.supervisor import EngineState, EngineSupervisor
from axserving.errors import APIError, MethodNotAllowed, NotFound, ServiceUnavailable
from axserving.logs import setup_logging
from axserving.middleware import ResponseHeadersMiddleware
from axserving.registry import ModelEntry
from axserving.routes import routes
from axserving.state import AppState, json_response
from engine_proc.backends.base import BackendConfig
from ipc.ring import sweep_orphans

log = logging.getLogger("axserving")

SETTINGS_ENV = "AXS__RESOLVED_SETTINGS"  # how `axserving run` hands settings to Granian's worker


def _render(err: APIError) -> Response:
    return json_response(err.body(), status=err.status, headers=err.headers or None)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return _render(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return _render(NotFound(f"Unknown route: {request.method} {request.url.path}"))
    if exc.status_code == 405:
        return _render(MethodNotAllowed(f"Method {request.method} not allowed on {request.url.path}"))
    return _render(APIError(str(exc.detail)))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _render(APIError("The server had an error while processing your request."))


def _backend_config(settings: Settings) -> BackendConfig:
    m = settings.model
    assert m.path is not None, "the CLI resolves the model path before the app starts"
    return BackendConfig(
        model_path=m.path,
        n_ctx=m.ctx_size,
        n_threads=m.threads,
        n_batch=m.batch_size,
        max_batch=m.max_batch,
        kv_unified=m.kv_unified,
        options=tuple(sorted(m.backend_options.items())),
    )


def create_app(settings: Settings) -> Starlette:
    state = AppState(settings=settings)

    def on_engine_event(model_id: str, engine_state: EngineState) -> None:
        if engine_state is EngineState.restarting:
            state.metrics.engine_restarts.labels(model_id).inc()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        removed = sweep_orphans()
        if removed:
            log.warning("removed %d shared-memory names left by dead processes", len(removed))
        m = settings.model
        supervisor = EngineSupervisor(
            m.id, m.backend.value, _backend_config(settings), settings.engine,
            log_level=settings.logging.level.value, on_event=on_engine_event,
        )
        state.registry.add(ModelEntry(m.id, m.path or "", m.backend.value, supervisor))
        supervisor.start()
        log.info("axserving front pid %d: serving model %r (%s)", os.getpid(), m.id, m.backend.value)
        try:
            yield
        finally:
            state.shutting_down = True
            for entry in state.registry:
                entry.supervisor.stopping()
            for entry in state.registry:
                await entry.supervisor.stop()
            log.info("all engines stopped")

    app = Starlette(
        routes=routes(),
        middleware=[
            Middleware(ResponseHeadersMiddleware),
            Middleware(BearerAuthMiddleware, keys=settings.api_keys),
        ],
        exception_handlers={
            APIError: _api_error,
            HTTPException: _http_error,
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
    return create_app(settings)
