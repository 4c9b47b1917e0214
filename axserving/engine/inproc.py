"""An engine client with no process: the fake backend stepped by an asyncio task in the front.

It is the fake backend (:mod:`engine_proc.backends.fake`: each request streams its prompt's
words back, one per step, through the shared output layer) without the rings, and takes the
same knobs from :class:`~engine_proc.spec.BackendConfig` options: ``delay_ms`` per step,
``load_delay_ms`` and ``fail_load=1`` (the crash markers are off: there is no process to lose).
The model manager's and the routes' tests run on it in-process, with no engine to spawn.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

from axserving.engine.client import EngineClient, EngineState, StateListener
from axserving.engine.stream import RequestStream
from axserving.errors import EngineUnavailable, from_engine_failure
from engine_proc import utility
from engine_proc.backends.base import RequestRejected
from engine_proc.backends.fake import FakeBackend
from engine_proc.spec import BackendConfig, flash_attn_setting
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
        self._backend = FakeBackend(config)
        self._backend.setup(0.0, markers=False)
        self._runner: asyncio.Task[None] | None = None
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
        stream = RequestStream(rid, self._abort, deadline, request.gen.n)
        try:
            if request.kind.utility:
                assert self._backend.tokenizer is not None
                stream.push(utility.answer(self._backend.tokenizer, request))
                return stream
            self._backend.submit(request)
        except RequestRejected as e:
            stream.fail(from_engine_failure(e.code, e.message, e.param))
            return stream
        self._streams[rid] = stream
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name=f"inproc:{self.model_id}")
        self.submitted += 1
        return stream

    async def _run(self) -> None:
        backend, streams = self._backend, self._streams
        while backend.has_work():
            await asyncio.sleep(self._delay)
            for delta in backend.step():
                stream = streams.get(delta.rid)
                if stream is not None and stream.push(delta):
                    del streams[delta.rid]

    def _abort(self, rid: int) -> None:
        self._streams.pop(rid, None)
        self._backend.abort(rid)

    @property
    def inflight(self) -> int:
        return len(self._streams)

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state.value, "pid": None, "restarts": 0, "backend": "inproc",
            "last_error": self.last_error, "inflight": self.inflight, "max_batch": self.config.max_batch,
            "kv_unified": self.config.kv_unified,
            "prefill_slowdown": self.config.prefill_slowdown,
            "prefill_stall_ms": self.config.prefill_stall_ms, "flash_attn": flash_attn_setting(self.config),
            "draft_tokens": self.config.draft_tokens,
            "running": self.inflight, "waiting": 0,
            "kv_usage": self._backend.kv_usage(), "preemptions_total": self._backend.preemptions,
            "prefill_tokens_total": self._backend.prefill_tokens, "rss_bytes": 0,  # it runs in the front
            "drafted_tokens_total": self._backend.drafted_tokens, "kept_tokens_total": self._backend.kept_tokens,
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
        for rid in streams:
            self._backend.abort(rid)
        if self._runner is not None:
            self._runner.cancel()
        self._set_state(EngineState.stopped)
