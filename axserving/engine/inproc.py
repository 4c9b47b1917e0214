"""An engine client with no process: the echo test double run as asyncio tasks in the front.

It behaves as the fake backend does behind the real client (each request streams its prompt's
words back, one per step, ``max_tokens`` and the stop strings' first word respected) and takes
the same knobs from :class:`~engine_proc.spec.BackendConfig` options: ``delay_ms`` per step,
``load_delay_ms`` and ``fail_load=1``. The model manager's and the routes' tests run on it
in-process, with no engine to spawn.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

from axserving.engine.client import EngineClient, EngineState, StateListener
from axserving.engine.stream import RequestStream
from axserving.errors import EngineUnavailable
from engine_proc.spec import BackendConfig
from ipc import records


class InprocEngineClient(EngineClient):
    def __init__(self, model_id: str, config: BackendConfig, on_event: StateListener | None = None) -> None:
        self.model_id = model_id
        self.config = config
        self.state = EngineState.loading
        self.last_error: str | None = None
        self._on_event = on_event
        self._delay = float(config.option("delay_ms", "2")) / 1000
        self._rids = itertools.count(1)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._streams: dict[int, RequestStream] = {}
        self._first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._loader: asyncio.Task[None] | None = None
        self.submitted = 0

    def _set_state(self, state: EngineState) -> None:
        self.state = state
        if self._on_event is not None:
            self._on_event(self.model_id, state)

    def start(self) -> None:
        self._loader = asyncio.create_task(self._load(), name=f"inproc-load:{self.model_id}")

    async def _load(self) -> None:
        await asyncio.sleep(float(self.config.option("load_delay_ms", "0")) / 1000)
        if self.config.option("fail_load") == "1":
            self.last_error = "model load failed: fake backend told to fail loading"
            self._set_state(EngineState.failed)
            self._first.set_exception(EngineUnavailable(self.last_error))
            self._first.exception()
            return
        self._set_state(EngineState.ready)
        self._first.set_result(None)

    async def started(self) -> None:
        await asyncio.shield(self._first)

    async def submit(
        self, build: Callable[[int], records.Submit], ready_by: float, deadline: float
    ) -> RequestStream:
        while self.state is EngineState.loading:
            if time.monotonic() >= ready_by:
                raise EngineUnavailable(f"model '{self.model_id}' is not ready; retry shortly")
            await asyncio.sleep(0.005)
        if self.state is not EngineState.ready:
            raise EngineUnavailable(f"model '{self.model_id}' is unavailable: engine {self.state.value}")
        rid = next(self._rids)
        request = build(rid)
        stream = RequestStream(rid, self._abort, deadline)
        self._streams[rid] = stream
        self._tasks[rid] = asyncio.create_task(self._echo(request, stream), name=f"inproc:{rid}")
        self.submitted += 1
        return stream

    async def _echo(self, request: records.Submit, stream: RequestStream) -> None:
        if request.messages is not None:
            users = [m.content for m in request.messages if m.role == "user"]
            source = users[-1] if users else request.messages[-1].content
        else:
            source = request.prompt or ""
        words = [w + " " for w in source.split()] or ["(empty) "]
        stops = request.params.stop
        n_prompt = len(source.split())
        try:
            for n, word in enumerate(words, 1):
                await asyncio.sleep(self._delay)
                if any(word.strip() == s.strip() for s in stops):
                    stream.push(records.Delta(request.rid, "", 0, "stop", n_prompt, n - 1))
                    return
                finish: records.FinishReason | None = None
                if n >= request.params.max_tokens:
                    finish = "length"
                elif n == len(words):
                    finish = "stop"
                stream.push(records.Delta(request.rid, word, 1, finish, n_prompt, n))
                if finish:
                    return
        finally:
            self._tasks.pop(request.rid, None)
            self._streams.pop(request.rid, None)

    def _abort(self, rid: int) -> None:
        self._streams.pop(rid, None)
        task = self._tasks.pop(rid, None)
        if task is not None:
            task.cancel()

    @property
    def inflight(self) -> int:
        return len(self._streams)

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state.value, "pid": None, "restarts": 0, "backend": "inproc",
            "last_error": self.last_error, "inflight": self.inflight, "max_batch": self.config.max_batch,
            "kv_unified": self.config.kv_unified, "running": self.inflight, "waiting": 0,
        }

    async def stop(self, timeout: float = 10.0) -> None:
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        if not self._first.done():
            self._first.set_exception(EngineUnavailable(f"model '{self.model_id}' was stopped while starting"))
            self._first.exception()
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.fail(EngineUnavailable("the model's engine stopped; retry shortly"))
        for task in list(self._tasks.values()):
            task.cancel()
        self._tasks.clear()
        self._set_state(EngineState.stopped)
