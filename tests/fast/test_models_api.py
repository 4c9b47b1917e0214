"""The models routes in-process (Starlette TestClient, in-process engines): load, list, retrieve,
unload, reload, alias routing, every error status, and per-model sampling defaults."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from starlette.testclient import TestClient

from axserving.app import create_app
from axserving.config import LifecycleSettings, ModelConfig, SamplingDefaults, Settings
from axserving.engine.client import StateListener
from axserving.engine.inproc import InprocEngineClient
from axserving.models.spec import ModelSpec
from tests.fast.test_model_spec import LLAMA, write_gguf

KEY = "sk-models"


def inproc(spec: ModelSpec, on_event: StateListener) -> InprocEngineClient:
    return InprocEngineClient(spec.id, spec.engine, on_event)


def fake(model_id: str, **kw: object) -> ModelConfig:
    return ModelConfig(id=model_id, path="fake://echo", backend="fake", **kw)  # type: ignore[arg-type]


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    return d


@pytest.fixture
def client(allowed: Path) -> Iterator[TestClient]:
    settings = Settings(
        models=(fake("base", aliases=("b",), sampling=SamplingDefaults(max_tokens=3)),),
        lifecycle=LifecycleSettings(
            max_loaded_models=3, max_memory_bytes="10MB", allowed_dirs=(str(allowed),), drain_timeout_secs=1,
        ),
        api_keys=(KEY,),
    )
    with TestClient(create_app(settings, engines=inproc), headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def chat(c: TestClient, model: str | None, text: str = "one two three four five") -> dict:  # type: ignore[type-arg]
    body: dict[str, object] = {"messages": [{"role": "user", "content": text}]}
    if model is not None:
        body["model"] = model
    r = c.post("/v1/chat/completions", json=body)
    return {"status": r.status_code, **r.json()}


def error(r) -> dict:  # type: ignore[no-untyped-def,type-arg]
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]  # type: ignore[no-any-return]


def test_load_list_retrieve_route_unload(client: TestClient) -> None:
    r = client.post("/v1/models", json={
        "model_id": "extra", "path": "fake://echo", "backend": "fake", "aliases": ["x1", "x2"], "pinned": True,
        "context_length": 512, "max_batch": 2,
    })
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"] == "extra" and body["state"] == "ready" and body["aliases"] == ["x1", "x2"]
    assert body["pinned"] is True and body["context_length"] == 512 and body["max_batch"] == 2
    assert isinstance(body["load_time_ms"], int) and body["source"] == "api"

    oai = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client, max_retries=0)
    listed = {m.id: m for m in oai.models.list().data}
    assert set(listed) == {"base", "extra"}
    extra = listed["extra"].model_dump()
    assert (extra["state"], extra["backend"], extra["aliases"], extra["pinned"]) == ("ready", "fake", ["x1", "x2"], True)
    assert oai.models.retrieve("x2").id == "extra"  # by alias too

    assert chat(client, "x1")["choices"][0]["message"]["content"] == "one two three four five "
    assert chat(client, "x1")["model"] == "x1"  # the name the client asked for
    assert 'axs_engine_up{model="extra"} 1.0' in client.get("/metrics").text
    r = client.delete("/v1/models/extra")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert 'axs_engine_up{model="extra"}' not in client.get("/metrics").text  # no stale series
    gone = chat(client, "x1")
    assert gone["status"] == 404 and gone["error"]["code"] == "model_not_found"
    assert error(client.delete("/v1/models/extra"))["type"] == "not_found_error"
    assert client.get("/models").status_code == 200  # without the /v1 prefix too


def test_per_model_defaults_and_the_default_model(client: TestClient) -> None:
    # base's own max_tokens default (3) applies when the request gives none; the request's wins.
    r = chat(client, None)
    assert r["model"] == "base" and r["choices"][0]["message"]["content"] == "one two three "
    assert r["choices"][0]["finish_reason"] == "length"
    r = client.post("/v1/chat/completions", json={
        "model": "b", "max_tokens": 4, "messages": [{"role": "user", "content": "one two three four five"}],
    })
    assert r.json()["usage"]["completion_tokens"] == 4
    loaded = client.post("/v1/models", json={"model_id": "plain", "path": "fake://echo", "backend": "fake"})
    assert loaded.status_code == 201
    assert chat(client, "plain")["usage"]["completion_tokens"] == 5  # no default of its own


def test_reload_keeps_serving(client: TestClient) -> None:
    before = client.get("/v1/admin/status").json()["models"][0]["engine"]
    r = client.post("/v1/models/base/reload")
    assert r.status_code == 200 and r.json()["state"] == "ready"
    assert chat(client, "base")["status"] == 200
    assert error(client.post("/v1/models/nope/reload"))["code"] == "model_not_found"
    assert before["state"] == "ready"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"path": "fake://echo"}, 400, "model_id"),
        ({"model_id": "m"}, 400, "path"),
        ({"model_id": 5, "path": "fake://echo"}, 400, "model_id"),
        ({"model_id": "m", "path": "fake://echo", "n_gpu_layers": 99}, 400, None),  # not silently ignored
        ({"model_id": "bad id!", "path": "fake://echo"}, 422, "model_id"),
        ({"model_id": "m" * 129, "path": "fake://echo"}, 422, "model_id"),
        ({"model_id": "m", "path": "fake://echo", "context_length": 1}, 422, "context_length"),
        ({"model_id": "m", "path": "fake://echo", "sampling": {"temperature": 5}}, 422, "sampling.temperature"),
        ({"model_id": "m", "path": "fake://echo", "backend": "vllm"}, 422, "backend"),
        ({"model_id": "m", "path": "fake://echo", "prefill_slowdown": 0.5}, 422, "prefill_slowdown"),
        ({"model_id": "m", "path": "fake://echo", "prefill_slowdown": -1}, 422, "prefill_slowdown"),
        ({"model_id": "m", "path": "fake://echo", "prefill_slowdown": "fast"}, 400, "prefill_slowdown"),
        ({"model_id": "m", "path": "fake://echo", "prefill_stall_ms": -1}, 422, "prefill_stall_ms"),
        ({"model_id": "m", "path": "fake://echo", "flash_attn": "sometimes"}, 400, "flash_attn"),
        ({"model_id": "m", "path": "fake://echo", "draft_tokens": -1}, 422, "draft_tokens"),
        ({"model_id": "m", "path": "fake://echo", "draft_tokens": 4.5}, 400, "draft_tokens"),
        ({"model_id": "m", "path": "/no/such/file.gguf"}, 403, "path"),  # outside the allowed dirs
        ({"model_id": "base", "path": "fake://echo", "backend": "fake"}, 409, "model_id"),
        ({"model_id": "m", "path": "fake://echo", "backend": "fake", "aliases": ["b"]}, 409, "aliases"),
        ({"model_id": "m", "path": "fake://echo", "backend": "fake", "memory_bytes": "11MB"}, 507, None),
    ],
)
def test_load_errors(client: TestClient, body: dict, status: int, param: str | None) -> None:  # type: ignore[type-arg]
    r = client.post("/v1/models", json=body)
    assert r.status_code == status, r.text
    assert error(r)["param"] == param, r.text


def test_file_errors_inside_the_allowed_dirs(client: TestClient, allowed: Path) -> None:
    r = client.post("/v1/models", json={"model_id": "m", "path": str(allowed / "missing.gguf")})
    assert r.status_code == 422 and error(r)["code"] == "model_file_missing"
    r = client.post("/v1/models", json={"model_id": "m", "path": str(allowed / "a\x00.gguf")})  # found by the fuzzer: a 500
    assert r.status_code == 422 and error(r)["code"] == "invalid_path" and error(r)["param"] == "path"
    (allowed / "text.gguf").write_text("hello")
    r = client.post("/v1/models", json={"model_id": "m", "path": str(allowed / "text.gguf")})
    assert r.status_code == 422 and error(r)["code"] == "not_a_model"
    ok = write_gguf(allowed / "tiny.gguf", LLAMA)
    r = client.post("/v1/models", json={"model_id": "m", "path": str(ok), "backend": "fake", "memory_bytes": "1MB"})
    assert r.status_code == 201 and r.json()["architecture"] == "llama"


def test_capacity_503_and_memory_507(client: TestClient) -> None:
    for i in range(2):
        r = client.post("/v1/models", json={
            "model_id": f"p{i}", "path": "fake://echo", "backend": "fake", "pinned": True, "memory_bytes": "3MB",
        })
        assert r.status_code == 201
    r = client.post("/v1/models", json={"model_id": "more", "path": "fake://echo", "backend": "fake"})
    # base is evictable (idle, not pinned): it goes to make room.
    assert r.status_code == 201
    names = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert names == ["p0", "p1", "more"]
    client.post("/v1/models/more/reload")
    r = client.post("/v1/models", json={"model_id": "m4", "path": "fake://echo", "backend": "fake", "pinned": True})
    assert r.status_code == 201  # 'more' evicted
    r = client.post("/v1/models", json={"model_id": "m5", "path": "fake://echo", "backend": "fake"})
    assert r.status_code == 503 and error(r)["code"] == "max_loaded_models"
    client.delete("/v1/models/m4")
    r = client.post("/v1/models", json={"model_id": "m6", "path": "fake://echo", "backend": "fake", "memory_bytes": "5MB"})
    assert r.status_code == 507 and error(r)["code"] == "insufficient_memory"
    status = client.get("/v1/admin/status").json()
    assert status["memory"]["used_bytes"] == 6_000_000 and status["evictions"]["max_loaded_models"] == 2
    metrics = client.get("/metrics").text
    assert "axs_loaded_models 2.0" in metrics and 'axs_model_evictions_total{reason="max_loaded_models"} 2.0' in metrics


def test_health_is_open_and_private_details_are_not(client: TestClient) -> None:
    open_health = client.get("/health", headers={"Authorization": ""})
    assert open_health.status_code == 200
    text = open_health.text
    assert "fake://" not in text and "pid" not in text and "last_error" not in text
    assert client.get("/v1/models", headers={"Authorization": ""}).status_code == 401
    assert client.post("/v1/models", headers={"Authorization": ""}, json={}).status_code == 401


def test_a_bad_memory_size_is_a_422(client: TestClient) -> None:
    r = client.post("/v1/models", json={"model_id": "m", "path": "fake://echo", "backend": "fake", "memory_bytes": "lots"})
    assert r.status_code == 422 and error(r)["param"] == "memory_bytes"
