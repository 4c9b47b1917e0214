"""The model manager against in-process engine clients (no processes): states, loads that fail,
concurrent load and unload of one id, reload without downtime, and what eviction picks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from axserving.config import LifecycleSettings, ModelConfig, Settings
from axserving.engine.client import EngineState, StateListener
from axserving.engine.inproc import InprocEngineClient
from axserving.errors import (
    Conflict,
    EngineUnavailable,
    Forbidden,
    InsufficientMemory,
    ModelNotFound,
    ServiceUnavailable,
    UnprocessableRequest,
)
from axserving.models import manager as manager_module
from axserving.models.manager import ModelManager, ModelState
from axserving.models.spec import ModelSpec
from ipc.records import SamplingParams, Submit

T = TypeVar("T")


def fake(model_id: str, **kw: Any) -> ModelConfig:
    return ModelConfig(id=model_id, path="fake://echo", backend="fake", **kw)


def settings(*models: ModelConfig, **lifecycle: Any) -> Settings:
    return Settings(models=models, lifecycle=LifecycleSettings(**lifecycle))


def factory(spec: ModelSpec, on_event: StateListener) -> InprocEngineClient:
    return InprocEngineClient(spec.id, spec.engine, on_event)


def run(body: Callable[[ModelManager], Awaitable[T]], s: Settings) -> T:
    async def main() -> T:
        m = ModelManager(s, factory)
        await m.start()
        try:
            return await body(m)
        finally:
            await m.close()

    return asyncio.run(main())


async def ready(m: ModelManager, *ids: str) -> None:
    for i in ids:
        await m._models[i].engine.client.started()


async def generate(m: ModelManager, name: str | None, text: str = "a b c") -> str:
    lease = m.acquire(name)
    try:
        stream = await lease.client.submit(
            lambda rid: Submit(rid, SamplingParams(max_tokens=100), prompt=text), time.monotonic() + 10,
            time.monotonic() + 10,
        )
        out = []
        while (chunk := await stream.next()) is not None:
            out.append(chunk.text)
        return "".join(out)
    finally:
        lease.release()


# ---- routing and states -------------------------------------------------------------------------


def test_configured_models_route_by_id_alias_and_default() -> None:
    async def body(m: ModelManager) -> None:
        assert {x.id: x.state for x in m} == {"one": ModelState.loading, "two": ModelState.loading}
        await ready(m, "one", "two")
        assert {x.state for x in m} == {ModelState.ready}
        for name, want in ((None, "one"), ("second", "two"), ("2", "two")):  # None: the first configured
            lease = m.acquire(name)
            assert lease.model_id == want
            lease.release()
        assert await generate(m, "second", "x y") == "x y "
        with pytest.raises(ModelNotFound):
            m.acquire("three")

    slow = {"load_delay_ms": "200"}
    run(body, settings(fake("one", backend_options=slow), fake("two", aliases=("second", "2"), backend_options=slow)))


def test_default_model_setting_and_a_default_that_is_gone() -> None:
    async def body(m: ModelManager) -> None:
        await ready(m, "one", "two")
        lease = m.acquire(None)
        assert lease.model_id == "two"
        lease.release()
        await m.unload("two")
        with pytest.raises(ModelNotFound, match="default model 'two' is not loaded"):
            m.acquire(None)

    s = settings(fake("one"), fake("two"))
    run(body, Settings(models=s.models, default_model="two"))


def test_load_reports_state_and_load_time_and_refuses_taken_names() -> None:
    async def body(m: ModelManager) -> None:
        model = await m.load(fake("new", aliases=("fresh",), backend_options={"load_delay_ms": "50"}))
        assert model.state is ModelState.ready and model.load_time_s is not None and model.load_time_s >= 0.05
        assert model.describe(private=True)["load_time_ms"] >= 50
        with pytest.raises(Conflict, match="already loaded"):
            await m.load(fake("new"))
        with pytest.raises(Conflict, match="'fresh' is already used"):
            await m.load(fake("other", aliases=("fresh",)))
        with pytest.raises(Conflict, match="'one' is already used"):
            await m.load(fake("third", aliases=("one",)))
        assert [x.id for x in m] == ["one", "new"]

    run(body, settings(fake("one")))


def test_a_load_that_fails_leaves_nothing_behind() -> None:
    async def body(m: ModelManager) -> None:
        with pytest.raises(UnprocessableRequest, match="failed to load: model load failed") as info:
            await m.load(fake("broken", backend_options={"fail_load": "1"}))
        assert info.value.code == "model_load_failed"
        assert [x.id for x in m] == [] and m.memory_used == 0
        assert (await m.load(fake("broken"))).state is ModelState.ready  # the id is free again

    run(body, settings())


def test_file_checks(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    not_gguf = allowed / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    truncated = allowed / "short.gguf"
    truncated.write_bytes(b"GGUF\x03\x00")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "m.gguf").write_bytes(b"GGUF")

    async def body(m: ModelManager) -> None:
        with pytest.raises(UnprocessableRequest, match="no such file") as info:
            await m.load(ModelConfig(id="a", path=str(allowed / "missing.gguf")))
        assert info.value.param == "path"
        with pytest.raises(UnprocessableRequest, match="not a model file"):
            await m.load(ModelConfig(id="a", path=str(not_gguf)))
        with pytest.raises(UnprocessableRequest, match="header ends early"):
            await m.load(ModelConfig(id="a", path=str(truncated)))
        with pytest.raises(UnprocessableRequest, match="is a directory but not an MLX model"):
            await m.load(ModelConfig(id="a", path=str(allowed)))
        with pytest.raises(Forbidden):
            await m.load(ModelConfig(id="a", path=str(outside / "m.gguf")))
        with pytest.raises(Forbidden):
            await m.load(ModelConfig(id="a", path=str(allowed / ".." / "elsewhere" / "m.gguf")))
        # A symlink inside the allowed directory does not lead out of it.
        (allowed / "link.gguf").symlink_to(outside / "m.gguf")
        with pytest.raises(Forbidden):
            await m.load(ModelConfig(id="a", path=str(allowed / "link.gguf")))
        with pytest.raises(UnprocessableRequest, match="unknown backend 'vllm'"):
            await m.load(ModelConfig(id="a", path="fake://echo", backend="vllm"))
        assert len(m) == 0

    run(body, Settings(lifecycle=LifecycleSettings(allowed_dirs=(str(allowed),)), models=()))


# ---- concurrency on one id ----------------------------------------------------------------------


def test_concurrent_loads_of_one_id_load_it_once() -> None:
    async def body(m: ModelManager) -> None:
        results = await asyncio.gather(
            *(m.load(fake("twin", backend_options={"load_delay_ms": "30"})) for _ in range(3)),
            return_exceptions=True,
        )
        assert sum(not isinstance(r, BaseException) for r in results) == 1
        assert all(isinstance(r, Conflict) for r in results if isinstance(r, BaseException))
        assert [x.id for x in m] == ["twin"]

    run(body, settings())


def test_unload_during_load_cancels_the_load() -> None:
    async def body(m: ModelManager) -> None:
        load = asyncio.ensure_future(m.load(fake("slow", backend_options={"load_delay_ms": "300"})))
        await asyncio.sleep(0.05)
        assert [x.state for x in m] == [ModelState.loading]
        assert (await m.unload("slow"))["deleted"] is True
        with pytest.raises(Conflict, match="unloaded while it was loading"):
            await load
        assert len(m) == 0
        with pytest.raises(ModelNotFound):
            await m.unload("slow")

    run(body, settings())


def test_unload_drains_requests_in_flight_and_refuses_new_ones() -> None:
    async def body(m: ModelManager) -> None:
        await ready(m, "one")
        lease = m.acquire("one")
        unload = asyncio.ensure_future(m.unload("one"))
        await asyncio.sleep(0.05)
        assert not unload.done() and [x.state for x in m] == [ModelState.unloading]
        with pytest.raises(ModelNotFound):
            m.acquire("one")  # no new requests while it drains
        lease.release()
        result = await asyncio.wait_for(unload, 2)
        assert result == {"id": "one", "object": "model", "deleted": True, "drained": 1, "cancelled": 0}
        assert len(m) == 0 and lease.client.state is EngineState.stopped

    run(body, settings(fake("one")))


def test_unload_cuts_off_what_outlasts_the_drain_timeout() -> None:
    async def body(m: ModelManager) -> None:
        await ready(m, "one")
        lease = m.acquire("one")
        started = time.monotonic()
        result = await m.unload("one")
        assert 0.2 <= time.monotonic() - started < 2
        assert result["drained"] == 0 and result["cancelled"] == 1
        lease.release()  # late, and harmless

    run(body, settings(fake("one"), drain_timeout_secs=0.2))


# ---- reload ---------------------------------------------------------------------------------------


def test_reload_moves_new_requests_to_the_new_engine_and_drains_the_old() -> None:
    async def body(m: ModelManager) -> None:
        await ready(m, "one")
        old_lease = m.acquire("one")
        old = old_lease.client
        stream = await old.submit(
            lambda rid: Submit(rid, SamplingParams(max_tokens=100), prompt="w " * 40), time.monotonic() + 10,
            time.monotonic() + 10,
        )
        model = await m.reload("one")
        assert model.engine.client is not old and model.state is ModelState.ready
        new_lease = m.acquire("one")
        assert new_lease.client is model.engine.client
        new_lease.release()
        assert old.state is EngineState.ready  # still serving what it had
        words = []
        while (chunk := await stream.next()) is not None:
            words.append(chunk.text)
        assert "".join(words) == "w " * 40  # the request in flight finished whole
        old_lease.release()
        for _ in range(100):
            if old.state is EngineState.stopped:
                break
            await asyncio.sleep(0.01)
        assert old.state is EngineState.stopped and model.draining == []

    run(body, settings(fake("one", backend_options={"delay_ms": "5"})))


def test_a_reload_that_fails_keeps_the_old_engine() -> None:
    async def body(m: ModelManager) -> None:
        model = await m.load(fake("one"))
        old = model.engine.client
        # The file "changed" under it: the entry now fails to load.
        model.config = fake("one", backend_options={"fail_load": "1"})
        with pytest.raises(UnprocessableRequest, match="failed to load"):
            await m.reload("one")
        assert model.engine.client is old and model.next is None and model.state is ModelState.ready
        assert await generate(m, "one") == "a b c "

    run(body, settings())


def test_a_second_reload_during_the_first_is_a_conflict() -> None:
    async def body(m: ModelManager) -> None:
        model = await m.load(fake("one"))
        model.config = fake("one", backend_options={"load_delay_ms": "200"})
        first = asyncio.ensure_future(m.reload("one"))
        await asyncio.sleep(0.05)
        with pytest.raises(Conflict, match="already reloading"):
            await m.reload("one")
        await first

    run(body, settings())


# ---- eviction -------------------------------------------------------------------------------------


def test_lru_eviction_under_max_loaded_models_skips_pinned_and_busy() -> None:
    async def body(m: ModelManager) -> None:
        await ready(m, "a", "b", "c")
        await generate(m, "c")
        await generate(m, "b")
        await generate(m, "a")  # least recently used now: pinned p, then c, then b
        await m.load(fake("d"))
        assert sorted(x.id for x in m) == ["a", "b", "d", "p"]  # c went, p is pinned
        assert m.evictions[manager_module.EvictReason.max_loaded_models] == 1
        busy = m.acquire("b")  # b is now the least recently used but busy: a goes
        await m.load(fake("e"))
        assert sorted(x.id for x in m) == ["b", "d", "e", "p"]
        busy.release()
        held = [m.acquire(i) for i in ("b", "d", "e")]
        with pytest.raises(ServiceUnavailable, match="none can be evicted") as info:
            await m.load(fake("f"))
        assert info.value.code == "max_loaded_models"
        for lease in held:
            lease.release()

    run(body, settings(fake("p", pinned=True), fake("a"), fake("b"), fake("c"), max_loaded_models=4))


def test_memory_budget_evicts_lru_until_the_model_fits_else_507() -> None:
    async def body(m: ModelManager) -> None:
        await ready(m, "a", "b")
        await generate(m, "a")  # b is least recently used
        assert m.memory_used == 700
        await m.load(fake("c", memory_bytes=500))
        assert sorted(x.id for x in m) == ["a", "c"] and m.memory_used == 900
        assert m.evictions[manager_module.EvictReason.memory] == 1
        with pytest.raises(InsufficientMemory, match="more than the memory budget"):
            await m.load(fake("huge", memory_bytes="2KB"))
        lease = m.acquire("a")
        with pytest.raises(InsufficientMemory, match="would not free enough"):
            await m.load(fake("d", memory_bytes=700))  # c is evictable, a is busy: 400 + 700 > 1000
        lease.release()
        await m.load(fake("d", memory_bytes=600))  # c (least recently used) goes: 400 + 600
        assert sorted(x.id for x in m) == ["a", "d"]

    run(body, settings(fake("a", memory_bytes=400), fake("b", memory_bytes=300), max_memory_bytes=1000))


def test_a_loading_model_is_never_evicted() -> None:
    async def body(m: ModelManager) -> None:
        slow = asyncio.ensure_future(m.load(fake("slow", backend_options={"load_delay_ms": "200"})))
        await asyncio.sleep(0.05)
        with pytest.raises(ServiceUnavailable):
            await m.load(fake("other"))
        await slow

    run(body, settings(max_loaded_models=1))


def test_idle_models_are_unloaded_but_pinned_and_busy_ones_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manager_module, "IDLE_CHECK_S", 0.05)

    async def body(m: ModelManager) -> None:
        await ready(m, "idle", "pinned", "busy")
        lease = m.acquire("busy")
        await asyncio.sleep(1.3)
        assert sorted(x.id for x in m) == ["busy", "pinned"]
        assert m.evictions[manager_module.EvictReason.idle] == 1
        lease.release()
        await asyncio.sleep(1.3)
        assert [x.id for x in m] == ["pinned"]

    run(body, settings(
        fake("idle", idle_timeout_secs=1), fake("pinned", idle_timeout_secs=1, pinned=True),
        fake("busy", idle_timeout_secs=1),
    ))


def test_state_transitions_of_a_model_whose_engine_fails_at_start_up() -> None:
    seen: list[tuple[str, EngineState]] = []

    async def main() -> None:
        m = ModelManager(settings(fake("bad", backend_options={"fail_load": "1"})), factory,
                         on_event=lambda i, s: seen.append((i, s)))
        await m.start()
        with pytest.raises(EngineUnavailable, match="fake backend told to fail loading"):
            await m._models["bad"].engine.client.started()
        assert [x.state for x in m] == [ModelState.failed] and not m.any_ready()
        assert m._models["bad"].evictable()  # a failed model's memory can be reclaimed
        await m.close()

    asyncio.run(main())
    assert seen == [("bad", EngineState.failed), ("bad", EngineState.stopped)]
