"""The models the front serves, and their life cycle: load, unload, zero-downtime reload, and
eviction (idle timeout; least recently used under ``max_loaded_models`` and the memory budget).

Each model has one serving engine (an :class:`~axserving.engine.client.EngineClient`), and
during a reload a second one starting beside it; engines a reload or an unload replaced drain
their requests before they are stopped. A request holds a :class:`Lease` on the engine it was
routed to from the moment it is admitted until its response ends, which is what "in flight"
means here: a model with a lease is never evicted, and an engine is stopped only once its
leases are gone (or the drain timeout passed).

Decisions about room (what to evict so that a model fits) are taken under one lock and never
wait on anything but the engines they stop; routing a request (:meth:`ModelManager.acquire`)
is a dictionary look-up.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from axserving.config import ModelConfig, Settings
from axserving.engine.client import EngineClient, EngineState, StateListener
from axserving.errors import (
    Conflict,
    EngineUnavailable,
    InsufficientMemory,
    InvalidRequest,
    ModelNotFound,
    ServiceUnavailable,
    UnprocessableRequest,
)
from axserving.models import memory
from axserving.models.spec import ModelSpec, resolve

log = logging.getLogger("axserving.models")

ClientFactory = Callable[[ModelSpec, StateListener], EngineClient]
Resolver = Callable[[ModelConfig], Awaitable[ModelSpec]]

IDLE_CHECK_S = 1.0
STOP_TIMEOUT_S = 10.0


class ModelState(str, enum.Enum):
    """What ``GET /v1/models`` says of a model: its engine's state, or that it is leaving."""

    loading = "loading"
    ready = "ready"
    restarting = "restarting"
    failed = "failed"
    unresponsive = "unresponsive"  # ready, but its heartbeat is late: a hang is suspected
    unloading = "unloading"


class EvictReason(str, enum.Enum):
    idle = "idle"
    max_loaded_models = "max_loaded_models"
    memory = "memory"


@dataclass(eq=False)
class Engine:
    """One engine client and the requests that hold it."""

    client: EngineClient
    memory_bytes: int
    leases: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()


@dataclass(eq=False)
class Model:
    spec: ModelSpec
    config: ModelConfig  # what it was loaded from: a reload resolves it again
    engine: Engine
    source: str  # "config" or "api"
    next: Engine | None = None  # a reload's engine, starting
    draining: list[Engine] = field(default_factory=list)  # replaced, finishing their requests
    unloading: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    last_used: float = field(default_factory=time.monotonic)
    load_time_s: float | None = None

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def state(self) -> ModelState:
        state = self.engine.client.state
        if self.unloading or state is EngineState.stopped:
            return ModelState.unloading
        if state is EngineState.ready and self.engine.client.stale():
            return ModelState.unresponsive
        return ModelState(state.value)

    def engines(self) -> Iterator[Engine]:
        yield self.engine
        if self.next is not None:
            yield self.next
        yield from self.draining

    @property
    def leases(self) -> int:
        return sum(e.leases for e in self.engines())

    @property
    def memory_bytes(self) -> int:
        return sum(e.memory_bytes for e in self.engines())

    def evictable(self) -> bool:
        """Not pinned, not starting or reloading, nothing in flight."""
        return (
            not self.spec.pinned
            and not self.unloading
            and self.next is None
            and self.leases == 0
            and self.engine.client.state in (EngineState.ready, EngineState.failed)
        )

    def describe(self, private: bool) -> dict[str, Any]:
        """For ``GET /v1/models`` (``private``: paths, errors, engine details) and ``/health``."""
        out: dict[str, Any] = {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": "axserving",
            "state": self.state.value,
            "backend": self.spec.backend,
            "aliases": list(self.spec.aliases),
            "pinned": self.spec.pinned,
            # What the model serves: generation (chat, completions, responses, messages) or embeddings.
            "capabilities": ["embeddings"] if self.spec.engine.embeddings else ["generation"],
        }
        if private:
            snap = self.engine.client.snapshot()
            out.update(
                path=self.spec.path,
                source=self.source,
                architecture=self.spec.architecture,
                description=self.spec.description,
                context_length=self.spec.engine.n_ctx,
                max_batch=self.spec.engine.max_batch,
                threads=self.spec.engine.n_threads,
                memory_bytes=self.spec.memory_bytes,
                memory_estimated=self.spec.memory_estimated,
                idle_timeout_secs=self.spec.idle_timeout_secs,
                sampling={k: v for k, v in msgspec.structs.asdict(self.spec.sampling).items() if v is not None},
                load_time_ms=None if self.load_time_s is None else round(self.load_time_s * 1000),
                reloading=self.next is not None,
                inflight=self.leases,
                last_error=self.engine.client.last_error,
                engine=snap,
            )
        return out


class Lease:
    """A request's hold on the engine it was routed to; :meth:`release` is idempotent."""

    __slots__ = ("_engine", "_model", "client", "model_id", "spec")

    def __init__(self, model: Model, engine: Engine) -> None:
        self._model: Model | None = model
        self._engine = engine
        self.client = engine.client
        self.model_id = model.id
        self.spec = model.spec
        engine.leases += 1
        engine.idle.clear()
        model.last_used = time.monotonic()

    def release(self) -> None:
        model, self._model = self._model, None
        if model is None:
            return
        engine = self._engine
        engine.leases -= 1
        if engine.leases == 0:
            engine.idle.set()
        model.last_used = time.monotonic()


class ModelManager:
    def __init__(
        self,
        settings: Settings,
        factory: ClientFactory,
        on_event: StateListener | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.settings = settings
        self._factory = factory
        self._on_event = on_event
        self._resolver = resolver or self._resolve
        self._models: dict[str, Model] = {}  # by id, including models being unloaded
        self._names: dict[str, Model] = {}  # id and aliases → model, for routing
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._closing = False
        lifecycle = settings.lifecycle
        self.memory_budget = memory.budget(lifecycle.max_memory_bytes)
        self.evictions: dict[EvictReason, int] = {r: 0 for r in EvictReason}
        self.default_model = settings.default_model or (settings.models[0].id if settings.models else None)

    # ---- routing ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Model]:
        return iter(list(self._models.values()))

    def __len__(self) -> int:
        return len(self._models)

    def any_ready(self) -> bool:
        return any(m.state is ModelState.ready for m in self._models.values())

    def find(self, name: str) -> Model:
        model = self._names.get(name)
        if model is None:
            raise ModelNotFound(f"The model '{name}' does not exist or is not loaded", param="model")
        return model

    def acquire(self, name: str | None) -> Lease:
        """A lease on the engine now serving ``name`` (an id or alias; None: the default)."""
        if name is None:
            if self.default_model is None:
                raise InvalidRequest("'model' is required: no default model is configured", param="model")
            model = self._names.get(self.default_model)
            if model is None:
                raise ModelNotFound(
                    f"the request names no model, and the default model '{self.default_model}' is not loaded",
                    param="model",
                )
        else:
            model = self.find(name)
        return Lease(model, model.engine)

    @property
    def memory_used(self) -> int:
        return sum(m.memory_bytes for m in self._models.values())

    # ---- start-up and shutdown -------------------------------------------------------------

    async def _resolve(self, config: ModelConfig) -> ModelSpec:
        s = self.settings
        return await asyncio.to_thread(
            resolve, config, s.model_defaults, s.model_store.cache_dir, s.lifecycle.allowed_dirs,
            memory_budget=self.memory_budget,
        )

    async def start(self) -> None:
        """Register and start the configured models (not waiting for them to be ready: the
        supervisor restarts an engine that fails; ``/readyz`` says when one can serve)."""
        self._reaper = asyncio.create_task(self._reap_idle(), name="models:idle")
        self._reaper.add_done_callback(_log_crash)
        for config in self.settings.models:
            spec = await self._resolver(config)
            model = self._register(spec, config, "config")
            model.engine.client.start()

    async def close(self) -> None:
        """Shutdown: stop every engine (in parallel); nothing is restarted from now on."""
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
        for model in self._models.values():
            for engine in model.engines():
                engine.client.stopping()
        engines = [e for m in self._models.values() for e in m.engines()]
        await asyncio.gather(*(e.client.stop(STOP_TIMEOUT_S) for e in engines), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._models.clear()
        self._names.clear()

    # ---- load ------------------------------------------------------------------------------

    def _check_names(self, config: ModelConfig) -> None:
        if config.id in self._models:
            state = self._models[config.id].state.value
            raise Conflict(f"model '{config.id}' is already loaded ({state})", param="model_id", code="model_exists")
        for name in (config.id, *config.aliases):
            if name in self._names:
                raise Conflict(
                    f"the name '{name}' is already used by model '{self._names[name].id}'",
                    param="aliases" if name != config.id else "model_id", code="model_exists",
                )

    def _register(self, spec: ModelSpec, config: ModelConfig, source: str) -> Model:
        client = self._factory(spec, self._listener)
        model = Model(spec, config, Engine(client, spec.memory_bytes), source)
        self._models[spec.id] = model
        for name in spec.names:
            self._names[name] = model
        return model

    def _listener(self, model_id: str, state: EngineState) -> None:
        if self._on_event is not None:
            self._on_event(model_id, state)

    async def load(self, config: ModelConfig) -> Model:
        """Load a model at run time; returns once its engine is ready.

        409 if the id or an alias is taken, 403/422 for the file (see :func:`resolve`), 503 at
        ``max_loaded_models`` with nothing evictable, 507 if it cannot fit in the memory
        budget even after eviction, 422 if its engine fails to load it.
        """
        if self._closing:
            raise ServiceUnavailable("the server is shutting down")
        self._check_names(config)  # fail fast, before reading the file
        spec = await self._resolver(config)
        async with self._lock:
            self._check_names(config)
            victims = self._plan_room(spec.memory_bytes, extra_models=1, exclude=None)
            for victim, reason in victims:
                self._begin_unload(victim, f"evicted ({reason.value}) to make room for '{spec.id}'")
                self.evictions[reason] += 1
            model = self._register(spec, config, "api")
        try:
            # Their memory must be free before the new engine takes its own.
            await asyncio.gather(*(self._finish_unload(v, drain=False) for v, _ in victims))
            started = time.monotonic()
            model.engine.client.start()
            await self._await_start(model, model.engine)
            model.load_time_s = time.monotonic() - started
        except BaseException:
            if self._models.get(spec.id) is model:
                self._begin_unload(model, "its load failed")
                await self._finish_unload(model, drain=False)
            raise
        log.info("model %s loaded in %.2fs (%s, %s)", spec.id, model.load_time_s, spec.backend,
                 memory.fmt(spec.memory_bytes))
        return model

    async def _await_start(self, model: Model, engine: Engine) -> None:
        try:
            await engine.client.started()
        except EngineUnavailable as e:
            if model.unloading and engine is model.engine:
                raise Conflict(f"model '{model.id}' was unloaded while it was loading", code="model_unloaded") from e
            raise UnprocessableRequest(
                f"model '{model.id}' failed to load: {engine.client.last_error or e.message}",
                param="path", code="model_load_failed",
            ) from e

    def _plan_room(self, need: int, extra_models: int, exclude: Model | None) -> list[tuple[Model, EvictReason]]:
        """The models to evict (least recently used first) so that ``need`` more bytes and
        ``extra_models`` more models fit; raises 507 or 503 if they cannot."""
        budget = self.memory_budget
        if need > budget:
            raise InsufficientMemory(
                f"the model needs about {memory.fmt(need)}, more than the memory budget of "
                f"{memory.fmt(budget)} (lifecycle.max_memory_bytes)"
            )
        candidates = sorted(
            (m for m in self._models.values() if m is not exclude and m.evictable()), key=lambda m: m.last_used
        )
        active = [m for m in self._models.values() if not m.unloading]
        count, used = len(active) + extra_models, self.memory_used + need
        victims: list[tuple[Model, EvictReason]] = []
        for m in candidates:
            over_count = count > self.settings.lifecycle.max_loaded_models
            if not over_count and used <= budget:
                break
            victims.append((m, EvictReason.max_loaded_models if over_count else EvictReason.memory))
            count -= 1
            used -= m.memory_bytes
        if count > self.settings.lifecycle.max_loaded_models:
            raise ServiceUnavailable(
                f"max_loaded_models ({self.settings.lifecycle.max_loaded_models}) are loaded and none can be "
                "evicted (pinned, loading or busy); unload one first",
                code="max_loaded_models",
            )
        if used > budget:
            raise InsufficientMemory(
                f"the model needs about {memory.fmt(need)}; {memory.fmt(self.memory_used)} of the "
                f"{memory.fmt(budget)} budget is used, and evicting every evictable model would not free enough",
            )
        return victims

    # ---- unload ----------------------------------------------------------------------------

    def _begin_unload(self, model: Model, why: str) -> None:
        """No new request reaches ``model`` from now on."""
        if model.unloading:
            return
        log.info("model %s: unloading (%s)", model.id, why)
        model.unloading = True
        for name in model.spec.names:
            if self._names.get(name) is model:
                del self._names[name]

    async def _finish_unload(self, model: Model, drain: bool) -> tuple[int, int]:
        """Wait (up to the drain timeout) for the requests in flight, stop the engines, forget
        the model. Returns (requests that finished while draining, requests cut off)."""
        before = model.leases
        if drain and before:
            await self._drain(list(model.engines()))
        cut = model.leases
        await asyncio.gather(*(e.client.stop(STOP_TIMEOUT_S) for e in model.engines()), return_exceptions=True)
        if self._models.get(model.id) is model:
            del self._models[model.id]
        log.info("model %s unloaded (%d drained, %d cut off)", model.id, before - cut, cut)
        return before - cut, cut

    async def _drain(self, engines: list[Engine]) -> None:
        timeout = self.settings.lifecycle.drain_timeout_secs
        waits = [asyncio.ensure_future(e.idle.wait()) for e in engines]
        try:
            await asyncio.wait(waits, timeout=timeout)
        finally:
            for w in waits:
                w.cancel()

    async def unload(self, name: str) -> dict[str, Any]:
        """``DELETE /v1/models/{id}``: stop routing to it, drain, stop its engine."""
        model = self._names.get(name) or self._models.get(name)
        if model is None or model.unloading:
            raise ModelNotFound(f"The model '{name}' does not exist or is not loaded", param="model")
        self._begin_unload(model, "requested")
        drained, cut = await self._finish_unload(model, drain=True)
        return {"id": model.id, "object": "model", "deleted": True, "drained": drained, "cancelled": cut}

    # ---- reload ----------------------------------------------------------------------------

    async def reload(self, name: str) -> Model:
        """``POST /v1/models/{id}/reload``: a new engine from the same entry (the file read
        again) is started beside the old one; once it is ready, new requests go to it and the
        old one drains in the background, so that requests in flight do not fail."""
        model = self.find(name)
        if model.next is not None:
            raise Conflict(f"model '{model.id}' is already reloading", code="reload_in_progress")
        if model.engine.client.state is EngineState.loading:
            raise Conflict(f"model '{model.id}' is still loading", code="model_loading")
        spec = await self._resolver(model.config)
        async with self._lock:
            if model.unloading or model.next is not None:
                raise Conflict(f"model '{model.id}' is being unloaded or reloaded", code="reload_in_progress")
            victims = self._plan_room(spec.memory_bytes, extra_models=0, exclude=model)
            for victim, reason in victims:
                self._begin_unload(victim, f"evicted ({reason.value}) to reload '{model.id}'")
                self.evictions[reason] += 1
            engine = Engine(self._factory(spec, self._listener), spec.memory_bytes)
            model.next = engine
        try:
            await asyncio.gather(*(self._finish_unload(v, drain=False) for v, _ in victims))
            started = time.monotonic()
            engine.client.start()
            await self._await_start(model, engine)
        except BaseException:
            model.next = None
            await engine.client.stop(STOP_TIMEOUT_S)
            raise
        if model.unloading:  # unloaded while the new engine started
            model.next = None
            await engine.client.stop(STOP_TIMEOUT_S)
            raise Conflict(f"model '{model.id}' was unloaded during its reload", code="model_unloaded")
        old = model.engine
        model.engine, model.next, model.spec = engine, None, spec
        model.load_time_s = time.monotonic() - started
        model.draining.append(old)
        self._spawn(self._retire(model, old), f"models:retire:{model.id}")
        log.info("model %s reloaded in %.2fs; the old engine drains %d requests",
                 model.id, model.load_time_s, old.leases)
        return model

    async def _retire(self, model: Model, engine: Engine) -> None:
        await self._drain([engine])
        engine.client.stopping()
        await engine.client.stop(STOP_TIMEOUT_S)
        if engine in model.draining:
            model.draining.remove(engine)

    # ---- idle eviction ---------------------------------------------------------------------

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(IDLE_CHECK_S)
            now = time.monotonic()
            for model in list(self._models.values()):
                timeout = model.spec.idle_timeout_secs
                if timeout and model.evictable() and now - model.last_used >= timeout:
                    self._begin_unload(model, f"idle for {now - model.last_used:.0f}s")
                    self.evictions[EvictReason.idle] += 1
                    self._spawn(self._finish_quietly(model), f"models:idle:{model.id}")

    async def _finish_quietly(self, model: Model) -> None:
        await self._finish_unload(model, drain=False)

    def _spawn(self, work: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(work)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_crash)


def _log_crash(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("background task %s failed", task.get_name(), exc_info=exc)

