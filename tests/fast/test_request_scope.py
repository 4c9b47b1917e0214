"""Per-request state is released however a response ends (issue 11 defect 10): a failing
response start, an engine error before the first byte, a dispatch bug in the front."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from starlette.testclient import TestClient

from axserving import protocol
from axserving.app import create_app
from axserving.config import ModelConfig, SchedulerSettings, Settings
from axserving.engine.client import StateListener
from axserving.engine.inproc import InprocEngineClient
from axserving.engine.stream import RequestStream
from axserving.generation import InferenceResponse, Job
from axserving.models.spec import ModelSpec
from axserving.responses import ChatShape
from ipc.records import ChatMessage, Submit

KEY = "sk-scope"


def inproc(spec: ModelSpec, on_event: StateListener) -> InprocEngineClient:
    return InprocEngineClient(spec.id, spec.engine, on_event)


def settings() -> Settings:
    return Settings(
        models=(ModelConfig(id="m", path="fake://echo", backend="fake"),),
        scheduler=SchedulerSettings(max_inflight=2, max_queue=0), api_keys=(KEY,),
    )


def job(stream: bool) -> Job:
    req = protocol.ChatCompletionRequest(messages=[protocol.Message(role="user", content="a b c")])
    messages = (ChatMessage("user", "a b c"),)
    return Job(
        endpoint="chat", model="m", sampling=protocol.sampling_params(req), shape=ChatShape,
        include_usage=False, stream=stream,
        build=lambda rid, params: Submit(rid=rid, params=params, messages=messages),
    )


@pytest.mark.parametrize("stream", [True, False])
def test_a_failing_response_start_releases_everything(stream: bool) -> None:
    async def main() -> None:
        app = create_app(settings(), engines=inproc)
        state = app.state.axs
        await state.models.start()
        try:
            await state.models._models["m"].engine.client.started()

            async def receive() -> dict[str, Any]:
                await asyncio.sleep(3600)
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    raise OSError("the connection broke")

            for _ in range(5):  # more than max_inflight: a leak would make the later ones 429
                with pytest.raises(OSError):
                    await InferenceResponse(state, job(stream))({"type": "http"}, receive, send)
            assert state.admitted == 0 and state.scheduler.inflight == 0
            assert state.models._models["m"].leases == 0
            assert state.models._models["m"].engine.client.inflight == 0  # the engine slot too
        finally:
            await state.models.close()

    asyncio.run(main())


def test_a_dispatch_bug_in_the_front_fails_the_engines_streams_and_restarts_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Real engine process (fake backend), the app in-process so the front's code can break."""
    real_push = RequestStream.push

    def push(self: RequestStream, delta: Any) -> None:
        if "boom" in delta.text:
            raise RuntimeError("a bug in the front")
        real_push(self, delta)

    monkeypatch.setattr(RequestStream, "push", push)
    s = Settings(models=(ModelConfig(id="m", path="fake://echo", backend="fake",
                                     backend_options={"delay_ms": "5"}),), api_keys=(KEY,))
    with TestClient(create_app(s), headers={"Authorization": f"Bearer {KEY}"}) as c:
        deadline = time.monotonic() + 20
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        def engine() -> dict[str, Any]:
            return c.get("/v1/admin/status").json()["models"][0]["engine"]  # type: ignore[no-any-return]

        old_pid = engine()["pid"]
        started = time.monotonic()
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x y boom z"}]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "engine_unavailable", r.text
        assert time.monotonic() - started < 5  # failed at once, not at the request timeout
        while not (engine()["state"] == "ready" and engine()["pid"] not in (None, old_pid)):
            assert time.monotonic() < deadline + 20
            time.sleep(0.05)
        ok = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "fine now"}]})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "fine now "
        assert c.get("/v1/admin/status").json()["inflight"] == 0
