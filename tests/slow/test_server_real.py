"""Slow tier: the real `axserving run` on the packaged SmolLM2 model, real Granian, real llama.cpp
engine process, driven by the official openai client."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.server import (
    BACKENDS,
    Server,
    leaked,
    openai_client,
    run_server,
    run_smollm,
    shm_names,
    smollm_on,
)

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def signal_engine_mid_stream(
    oai: openai.OpenAI, pid: int, sig: signal.Signals, sent_at: list[float] | None = None
) -> openai.APIError:
    """Start a long stream, send ``sig`` to the engine after 3 tokens (its time appended to
    ``sent_at``); the error that ends it."""
    stream = oai.chat.completions.create(
        model="default", stream=True, max_tokens=400, temperature=0.7, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}],
    )
    got = 0
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                got += 1
                if got == 3:
                    os.kill(pid, sig)
                    if sent_at is not None:
                        sent_at.append(time.monotonic())
    return info.value


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    backend, model = smollm_on(request)
    with run_smollm(tmp_path_factory.mktemp("real"), model, backend) as s:
        yield s


@pytest.fixture(scope="module")
def oai(server: Server) -> openai.OpenAI:
    return openai_client(server)


def test_default_model_is_served_without_model_flag(default_model: Path, tmp_path: Path) -> None:
    """`axserving run` with no --model serves the cached packaged model."""
    cache = default_model.parent
    with run_server(tmp_path, "--threads", "2", env={"AXS_MODEL_CACHE": str(cache)}, ready_timeout=180) as s:
        model = s.status()["models"][0]
        assert model["path"] == str(default_model)
        assert model["backend"] == "llama_cpp" and model["engine"]["backend"] == "llama_cpp"
        # The packaged model's own sampling defaults (its model card's), and nothing private in /health.
        assert model["sampling"] == {"temperature": 0.2, "top_p": 0.9}
        assert set(s.health()["models"][0]) == {"id", "state", "aliases", "running", "waiting", "restarts"}


def test_chat_non_streaming_answers_sensibly(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=48)
    answer = r.choices[0].message.content or ""
    assert "paris" in answer.lower(), answer
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.prompt_tokens > 10 and 0 < r.usage.completion_tokens <= 48
    assert "<|im_end|>" not in answer and "<|im_start|>" not in answer


def test_chat_streaming_matches_non_streaming(oai: openai.OpenAI) -> None:
    full = oai.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=48)
    chunks = list(
        oai.chat.completions.create(
            model="default", messages=QUESTION, temperature=0, max_tokens=48,
            stream=True, stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens  # type: ignore[union-attr]


def test_max_tokens_and_stop(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage and r.usage.completion_tokens == 3
    full = oai.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=48)
    text = full.choices[0].message.content or ""
    stop = text.split()[2]  # a word from the middle of the answer
    cut = oai.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=48, stop=[stop])
    assert stop not in (cut.choices[0].message.content or "")
    assert cut.choices[0].finish_reason == "stop"
    assert text.startswith(cut.choices[0].message.content or "")


def test_completions_endpoint(oai: openai.OpenAI) -> None:
    r = oai.completions.create(model="default", prompt="The capital of France is", temperature=0, max_tokens=8)
    assert r.choices[0].text.strip()
    assert r.usage is not None and r.usage.completion_tokens <= 8


def test_context_overflow_is_400(server: Server) -> None:
    long = "hello " * 3000  # > 2048 tokens
    for stream in (False, True):
        r = httpx.post(
            server.v1 + "/chat/completions", headers=server.headers(), timeout=60,
            json={"model": "default", "stream": stream, "messages": [{"role": "user", "content": long}]},
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "context_length_exceeded"


def test_huge_prompts_are_refused_at_once_and_running_streams_carry_on(server: Server, oai: openai.OpenAI) -> None:
    """Issue 11 defect 4: ten 7.8 MB prompts were tokenized whole, the engine missed its
    heartbeat and was killed as hung, failing an unrelated stream."""
    import concurrent.futures
    import time

    huge = "lighthouse " * 700_000  # 7.7 MB
    pid = server.engine_pid()

    def refuse() -> httpx.Response:
        return httpx.post(server.v1 + "/chat/completions", headers=server.headers(), timeout=60,
                          json={"messages": [{"role": "user", "content": huge}]})

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        stream = pool.submit(lambda: oai.chat.completions.create(
            model="default", max_tokens=64, temperature=0, extra_body={"ignore_eos": True}, messages=QUESTION,
        ))
        started = time.monotonic()
        refused = [f.result() for f in [pool.submit(refuse) for _ in range(5)]]
        took = time.monotonic() - started
        assert stream.result().usage.completion_tokens == 64  # type: ignore[union-attr]
    for r in refused:
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert took < 10, took  # the bodies' upload and parse; no tokenizing of 7.7 MB
    assert server.engine_pid() == pid  # never taken for hung


def test_bad_input_never_500(server: Server) -> None:
    h = server.headers()
    cases = [
        (b"{not json", 400),
        (b'{"model": "default"}', 400),
        (b'{"model": "default", "messages": 5}', 400),
        (b'{"model": "ghost", "messages": [{"role": "user", "content": "x"}]}', 404),
    ]
    for body, status in cases:
        r = httpx.post(server.v1 + "/chat/completions", content=body, timeout=30,
                       headers={**h, "content-type": "application/json"})
        assert r.status_code == status, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(server.v1 + "/models", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_engine_sigkill_mid_stream_recovers(server: Server, oai: openai.OpenAI) -> None:
    before = shm_names()
    pid = server.engine_pid()
    assert pid
    error = signal_engine_mid_stream(oai, pid, signal.SIGKILL)
    assert "engine" in str(error.message).lower()
    assert httpx.get(server.url + "/livez").status_code == 200
    server.wait_ready(120, previous_pid=pid)
    r = oai.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=48)
    assert "paris" in (r.choices[0].message.content or "").lower()
    assert leaked(before, server.group_pids()) == set()


def test_engine_hung_with_sigstop_is_found_in_seconds_and_replaced(default_model: Path, tmp_path: Path) -> None:
    """At the default settings, a SIGSTOPped engine is found within 3 s (its heartbeat limit
    follows its own step time, never under 2 s; it was 30 s), /health says so meanwhile, its
    stream ends with a clean error, and a new engine serves the next request."""
    import threading

    before = shm_names()
    with run_server(tmp_path, "--model", str(default_model), "--threads", "2", "--ctx-size", "2048",
                    ready_timeout=180) as s:
        oai = openai.OpenAI(base_url=s.v1, api_key=s.api_key, max_retries=0, timeout=120)
        pid = s.engine_pid()
        assert pid
        assert s.engine()["heartbeat_limit_secs"] == 2.0  # SmolLM2's full step is ~0.1-0.3 s
        states: list[str] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                states.append(s.health()["models"][0]["state"])
                time.sleep(0.1)

        watcher = threading.Thread(target=watch)
        watcher.start()
        sent_at: list[float] = []
        try:
            error = signal_engine_mid_stream(oai, pid, signal.SIGSTOP, sent_at)
            found_after = time.monotonic() - sent_at[0]
        finally:
            stop.set()
            watcher.join()
        assert "hung" in str(error.message)
        assert found_after < 3.0, found_after
        assert "unresponsive" in states, states
        s.wait_ready(120, previous_pid=pid)
        r = oai.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=48)
        assert "paris" in (r.choices[0].message.content or "").lower()
    assert leaked(before) == set()

