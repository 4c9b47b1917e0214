"""Slow tier: several real models in one `axserving run`. Gemma 3 270M loaded at run time beside
SmolLM2, both serving at once; a reload of SmolLM2 while its streams are in flight (none fails,
none is cut); an unload; and, from a config file, both models under a memory budget sized from
their own estimates: eviction keeps the pinned and the busy, and 507 when nothing can go."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from axserving.config import ModelConfig, ModelDefaults
from axserving.models.spec import resolve
from ipc.ring import pid_alive
from tests.server import Server, run_server

pytestmark = pytest.mark.slow

SPAIN = "The capital of France is Paris. The capital of Spain is"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=120)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")



def long_stream(oai: openai.OpenAI, model: str, tokens: int) -> tuple[int, str | None, str]:
    """(completion tokens, finish reason, text) of a greedy stream that ignores EOS."""
    usage, finish, text = None, None, []
    for chunk in oai.chat.completions.create(
        model=model, stream=True, max_tokens=tokens, temperature=0, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True}, messages=[{"role": "user", "content": "Tell me about lighthouses."}],
    ):
        if chunk.choices:
            finish = chunk.choices[0].finish_reason or finish
            text.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage.completion_tokens
    assert usage is not None
    return usage, finish, "".join(text)


@pytest.fixture(scope="module")
def server(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("models")
    with run_server(tmp, "--model", str(default_model), "--model-id", "smollm2", "--threads", "2",
                    "--ctx-size", "1024", "--max-batch", "4", ready_timeout=180) as s:  # fmt: skip
        yield s


def test_gemma_loaded_at_run_time_serves_beside_smollm2(server: Server, gemma_model: Path) -> None:
    r = httpx.post(f"{server.v1}/models", headers=server.headers(), timeout=180, json={
        "model_id": "gemma", "path": str(gemma_model), "aliases": ["gemma3"], "context_length": 1024,
        "max_batch": 2, "threads": 2,
    })
    assert r.status_code == 201, r.text
    loaded = r.json()
    assert loaded["backend"] == "llama_cpp" and loaded["architecture"] == "gemma3"  # backend: auto
    assert loaded["load_time_ms"] > 0 and loaded["memory_bytes"] > gemma_model.stat().st_size
    oai = client(server)
    assert {m.id for m in oai.models.list().data} == {"smollm2", "gemma"}

    def chat() -> str:
        r = oai.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=16, temperature=0)
        return r.choices[0].message.content or ""

    def complete() -> str:
        return oai.completions.create(model="gemma3", prompt=SPAIN, max_tokens=8, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        chats = [pool.submit(chat) for _ in range(2)]
        completions = [pool.submit(complete) for _ in range(2)]
        assert all("Paris" in f.result() for f in chats)
        assert all("Madrid" in f.result() for f in completions)
    # Each engine's memory stays within what was estimated before it started.
    for model in server.status()["models"]:
        assert rss(model["engine"]["pid"]) <= model["memory_bytes"], model

    pid = server.engine_pid("gemma")
    r = httpx.delete(f"{server.v1}/models/gemma3", headers=server.headers(), timeout=60)
    assert r.status_code == 200 and r.json()["id"] == "gemma"
    assert pid is not None and not pid_alive(pid)
    with pytest.raises(openai.NotFoundError):
        complete()


def test_reload_while_streams_are_in_flight(server: Server) -> None:
    oai = client(server)
    old = server.engine_pid("smollm2")
    tokens = 48
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(long_stream, oai, "smollm2", tokens) for _ in range(3)]
        time.sleep(1.0)
        r = httpx.post(f"{server.v1}/models/smollm2/reload", headers=server.headers(), timeout=180)
        assert r.status_code == 200, r.text
        results = [f.result() for f in streams]
    assert all(n == tokens and finish == "length" and text for n, finish, text in results), results
    assert len({text for _, _, text in results}) == 1  # greedy, same prompt: the same reply
    new = server.engine_pid("smollm2")
    assert old is not None and new not in (None, old)
    deadline = time.monotonic() + 20
    while pid_alive(old):
        assert time.monotonic() < deadline, "the old engine did not exit after its streams"
        time.sleep(0.1)
    after = long_stream(oai, "smollm2", tokens)
    assert after == results[0]  # the new engine answers as the old one did
    metrics = httpx.get(server.url + "/metrics").text
    assert 'status="503"' not in metrics and 'status="500"' not in metrics


def test_memory_budget_from_a_config_file(default_model: Path, gemma_model: Path, tmp_path: Path) -> None:
    defaults = ModelDefaults(ctx_size=1024, max_batch=2, threads=2)
    small = resolve(ModelConfig(id="s", path=str(default_model)), defaults, str(tmp_path)).memory_bytes
    gemma = resolve(ModelConfig(id="g", path=str(gemma_model)), defaults, str(tmp_path)).memory_bytes
    config = tmp_path / "serving.yaml"
    config.write_text(f"""
model_defaults: {{ctx_size: 1024, max_batch: 2, threads: 2}}
lifecycle: {{max_memory_bytes: {small + gemma + small // 2}}}
default_model: gemma
models:
  - {{id: small, path: "{default_model}"}}
  - {{id: gemma, path: "{gemma_model}", pinned: true, aliases: [gemma3]}}
""")
    with run_server(tmp_path, "--config", str(config), ready_timeout=180) as server:
        deadline = time.monotonic() + 120
        while not all(m["state"] == "ready" for m in server.health()["models"]):
            assert time.monotonic() < deadline, server.health()
            time.sleep(0.2)
        oai = client(server)
        assert "Madrid" in oai.completions.create(prompt=SPAIN, max_tokens=8, temperature=0, model="gemma3") \
            .choices[0].text
        # A second SmolLM2 does not fit beside both: the least recently used unpinned one goes.
        r = httpx.post(f"{server.v1}/models", headers=server.headers(), timeout=180,
                       json={"model_id": "small2", "path": str(default_model)})
        assert r.status_code == 201, r.text
        assert sorted(m["id"] for m in server.status()["models"]) == ["gemma", "small2"]
        assert server.status()["evictions"]["memory"] == 1
        # small2 busy, gemma pinned: a third cannot fit, and nothing is evicted for it.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            busy = pool.submit(long_stream, oai, "small2", 400)
            deadline = time.monotonic() + 30
            while not server.engine("small2")["inflight"]:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            r = httpx.post(f"{server.v1}/models", headers=server.headers(), timeout=180,
                           json={"model_id": "small3", "path": str(default_model)})
            assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_memory", r.text
            assert busy.result()[0] == 400
        assert sorted(m["id"] for m in server.status()["models"]) == ["gemma", "small2"]
