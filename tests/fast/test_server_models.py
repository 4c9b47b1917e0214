"""Several models through the real `axserving run` (Granian, engine processes, shared memory) on
the fake backend: models from a config file, aliases and the default model, a reload while
streams are in flight (none fails, none is cut), an unload that drains, idle eviction, and
concurrent load and unload of one id."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from ipc.ring import pid_alive
from tests.server import AXSERVING, REPO, Server, leaked, run_server, shm_names

CONFIG = """
default_model: echo
models:
  - id: echo
    path: fake://echo
    backend: fake
    aliases: [parrot]
    backend_options: {delay_ms: "10"}
  - id: terse
    path: fake://echo
    backend: fake
    sampling: {max_tokens: 2}
"""


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=60)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "serving.yaml"
    path.write_text(CONFIG)
    return path



def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def stream_text(oai: openai.OpenAI, model: str, words: int) -> tuple[str, str | None]:
    text, finish = [], None
    for chunk in oai.chat.completions.create(
        model=model, stream=True, messages=[{"role": "user", "content": " ".join(f"w{i}" for i in range(words))}],
    ):
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(text), finish


def test_models_from_a_config_file_aliases_and_the_default(tmp_path: Path, config: Path) -> None:
    with run_server(tmp_path, "--config", str(config)) as server:
        wait_for(lambda: all(m["state"] == "ready" for m in server.health()["models"]), 30, "both models")
        oai = client(server)
        listed = {m.id: m.model_dump() for m in oai.models.list().data}
        assert set(listed) == {"echo", "terse"} and listed["echo"]["aliases"] == ["parrot"]
        assert listed["terse"]["sampling"] == {"max_tokens": 2} and listed["echo"]["source"] == "config"
        r = httpx.post(server.v1 + "/chat/completions", headers=server.headers(), timeout=30,
                       json={"messages": [{"role": "user", "content": "no model here"}]})
        assert r.json()["model"] == "echo" and r.json()["choices"][0]["message"]["content"] == "no model here "
        r2 = oai.chat.completions.create(model="parrot", messages=[{"role": "user", "content": "via alias"}])
        assert r2.choices[0].message.content == "via alias " and r2.model == "parrot"
        r3 = oai.chat.completions.create(model="terse", messages=[{"role": "user", "content": "a b c d"}])
        assert r3.choices[0].message.content == "a b " and r3.choices[0].finish_reason == "length"
        assert server.engine_pid("echo") != server.engine_pid("terse")


def test_reload_while_streams_are_in_flight_fails_none(tmp_path: Path, config: Path) -> None:
    before = shm_names()
    with run_server(tmp_path, "--config", str(config)) as server:
        wait_for(lambda: all(m["state"] == "ready" for m in server.health()["models"]), 30, "both models")
        oai = client(server)
        old_pid = server.engine_pid("echo")
        assert old_pid
        words = 150  # 1.5 s at 10 ms a step: the reload lands mid-stream
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            streams = [pool.submit(stream_text, oai, "echo", words) for _ in range(4)]
            time.sleep(0.4)
            reloaded = pool.submit(
                httpx.post, f"{server.v1}/models/echo/reload", headers=server.headers(), timeout=60
            )
            time.sleep(0.1)
            # Requests that arrive during the reload are served too (by the old engine, then the new).
            during = [pool.submit(stream_text, oai, "parrot", 20) for _ in range(2)]
            r = reloaded.result()
            assert r.status_code == 200, r.text
            after = [pool.submit(stream_text, oai, "echo", 20) for _ in range(2)]
            expected = "".join(f"w{i} " for i in range(words))
            for f in streams:
                assert f.result() == (expected, "stop")  # whole, and ended normally
            for f in during + after:
                assert f.result() == ("".join(f"w{i} " for i in range(20)), "stop")
        new_pid = server.engine_pid("echo")
        assert new_pid not in (None, old_pid)
        wait_for(lambda: not pid_alive(old_pid), 10, "the old engine to exit")
        metrics = httpx.get(server.url + "/metrics").text
        assert 'status="503"' not in metrics and 'status="499"' not in metrics
        assert leaked(before, server.group_pids()) == set()


def test_unload_drains_then_stops_and_a_new_load_takes_its_place(tmp_path: Path, config: Path) -> None:
    with run_server(tmp_path, "--config", str(config)) as server:
        wait_for(lambda: all(m["state"] == "ready" for m in server.health()["models"]), 30, "both models")
        oai = client(server)
        pid = server.engine_pid("echo")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            stream = pool.submit(stream_text, oai, "echo", 100)
            time.sleep(0.3)
            started = time.monotonic()
            r = httpx.delete(f"{server.v1}/models/echo", headers=server.headers(), timeout=60)
            assert r.status_code == 200 and r.json()["drained"] == 1 and r.json()["cancelled"] == 0
            assert time.monotonic() - started > 0.3  # it waited for the stream
            assert stream.result() == ("".join(f"w{i} " for i in range(100)), "stop")
        assert pid is not None and not pid_alive(pid)
        assert [m["id"] for m in server.health()["models"]] == ["terse"]
        with pytest.raises(openai.NotFoundError):
            oai.chat.completions.create(model="parrot", messages=[{"role": "user", "content": "x"}])
        r = httpx.post(f"{server.v1}/models", headers=server.headers(), timeout=60,
                       json={"model_id": "echo", "path": "fake://echo", "backend": "fake", "aliases": ["parrot"]})
        assert r.status_code == 201, r.text
        assert oai.chat.completions.create(model="parrot", messages=[{"role": "user", "content": "back"}]) \
            .choices[0].message.content == "back "


def test_concurrent_load_and_unload_of_one_id(tmp_path: Path) -> None:
    with run_server(tmp_path, "--backend", "fake") as server:
        body = {"model_id": "twin", "path": "fake://echo", "backend": "fake",
                "backend_options": {"load_delay_ms": "300"}}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            loads = [pool.submit(httpx.post, f"{server.v1}/models", headers=server.headers(), json=body, timeout=60)
                     for _ in range(3)]
            codes = sorted(f.result().status_code for f in loads)
        assert codes == [201, 409, 409]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            load = pool.submit(httpx.post, f"{server.v1}/models", headers=server.headers(),
                               json={**body, "model_id": "brief"}, timeout=60)
            time.sleep(0.15)
            unload = httpx.delete(f"{server.v1}/models/brief", headers=server.headers(), timeout=60)
            assert unload.status_code == 200
            r = load.result()
        assert r.status_code == 409 and r.json()["error"]["code"] == "model_unloaded"
        ids = sorted(m["id"] for m in server.status()["models"])
        assert ids == ["default", "twin"]


def test_idle_models_are_evicted_and_the_pinned_stay(tmp_path: Path) -> None:
    with run_server(tmp_path, "--backend", "fake") as server:
        for name, pinned in (("idle", False), ("kept", True)):
            r = httpx.post(f"{server.v1}/models", headers=server.headers(), timeout=60, json={
                "model_id": name, "path": "fake://echo", "backend": "fake", "pinned": pinned, "idle_timeout_secs": 1,
            })
            assert r.status_code == 201
        pid = server.engine_pid("idle")
        wait_for(lambda: "idle" not in [m["id"] for m in server.health()["models"]], 10, "the idle model to go")
        assert pid is not None
        wait_for(lambda: not pid_alive(pid), 10, "its engine to exit")
        assert sorted(m["id"] for m in server.health()["models"]) == ["default", "kept"]
        assert 'axs_model_evictions_total{reason="idle"} 1.0' in httpx.get(server.url + "/metrics").text


def test_a_model_that_cannot_load_at_run_time_is_a_422(tmp_path: Path) -> None:
    with run_server(tmp_path, "--backend", "fake") as server:
        r = httpx.post(f"{server.v1}/models", headers=server.headers(), timeout=60, json={
            "model_id": "broken", "path": "fake://echo", "backend": "fake", "backend_options": {"fail_load": "1"},
        })
        assert r.status_code == 422 and r.json()["error"]["code"] == "model_load_failed"
        assert "model load failed" in r.json()["error"]["message"]
        assert [m["id"] for m in server.status()["models"]] == ["default"]


def test_start_up_refuses_models_that_cannot_fit_together(tmp_path: Path) -> None:
    config = tmp_path / "big.yaml"
    config.write_text(
        "lifecycle: {max_memory_bytes: 1GB}\n"
        "models:\n"
        "  - {id: a, path: 'fake://echo', backend: fake, memory_bytes: 600MB}\n"
        "  - {id: b, path: 'fake://echo', backend: fake, memory_bytes: 600MB}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AXS_")}
    env["AXS_ALLOW_NO_AUTH"] = "true"
    r = subprocess.run([*AXSERVING, "run", "--config", str(config)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "more than the memory budget" in r.stderr and "a 572.2 MiB" in r.stderr
    config.write_text("models:\n  - {id: a, path: 'fake://echo', backend: fake}\n  - {id: a, path: 'fake://x'}\n")
    r = subprocess.run([*AXSERVING, "run", "--config", str(config)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "'a' is already used" in r.stderr, r.stderr


def test_the_model_flag_replaces_the_configured_list(tmp_path: Path, config: Path) -> None:
    with run_server(tmp_path, "--config", str(config), "--model", "fake://solo", "--model-id", "solo",
                    "--backend", "fake") as server:  # fmt: skip
        assert [m["id"] for m in server.status()["models"]] == ["solo"]
        assert server.status()["default_model"] == "solo"


def test_error_statuses_through_the_server(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "notes.gguf").write_text("not a model")
    env = {"AXS_MODEL_ALLOWED_DIRS": str(allowed), "AXS_MAX_LOADED_MODELS": "1"}
    with run_server(tmp_path, "--backend", "fake", env=env) as server:
        def load(**body: object) -> httpx.Response:
            return httpx.post(f"{server.v1}/models", headers=server.headers(), json=body, timeout=60)

        assert load(model_id="x", path=str(tmp_path / "secret.gguf")).status_code == 403
        assert load(model_id="x", path=str(allowed / "notes.gguf")).json()["error"]["code"] == "not_a_model"
        assert load(model_id="default", path="fake://echo", backend="fake").status_code == 409
        # One model at most, and the loaded one is busy: nothing can be evicted.
        with httpx.stream("POST", server.v1 + "/chat/completions", headers=server.headers(), timeout=30,
                          json={"stream": True, "messages": [{"role": "user", "content": "z " * 3000}]}) as busy:
            lines = busy.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)
            r = load(model_id="x", path="fake://echo", backend="fake")
            assert r.status_code == 503 and r.json()["error"]["code"] == "max_loaded_models"
        assert load(model_id="x", path="fake://echo", backend="fake", memory_bytes="1PB").status_code == 507
        assert httpx.delete(f"{server.v1}/models/nope", headers=server.headers()).status_code == 404
        assert httpx.post(f"{server.v1}/models/nope/reload", headers=server.headers()).status_code == 404
        assert httpx.post(f"{server.v1}/models", json={}).status_code == 401
