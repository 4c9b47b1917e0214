"""Slow tier: continuous batching through the real `axserving run` on the packaged SmolLM2 model,
driven by the official openai client from several threads at once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from tests.batching import PROMPTS
from tests.server import BACKENDS, Server, run_server, smollm_on

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("batching")
    backend, model = smollm_on(request)
    with run_server(
        tmp, "--model", str(model), "--backend", backend, "--threads", "2", "--ctx-size", "4096",
        env={"AXS_MAX_BATCH": "4"}, ready_timeout=180,
    ) as s:  # fmt: skip
        yield s


@pytest.fixture(scope="module")
def oai(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=120)


def stream_text(oai: openai.OpenAI, content: str, **kw: Any) -> tuple[str, Any]:
    kw = {"max_tokens": 40, "temperature": 0} | kw
    chunks = list(
        oai.chat.completions.create(
            model="default", messages=[{"role": "user", "content": content}],
            stream=True, stream_options={"include_usage": True}, **kw,
        )
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].usage


def engine_stats(server: Server) -> dict[str, Any]:
    engine: dict[str, Any] = server.engine()
    return engine


def test_concurrent_streams_are_batched_and_each_gets_its_own_text(server: Server, oai: openai.OpenAI) -> None:
    alone = [stream_text(oai, p)[0] for p in PROMPTS]
    time.sleep(1.2)  # the engine reports its counters once a second
    before = engine_stats(server)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: stream_text(oai, p), PROMPTS))
    for i, (text, usage) in enumerate(together):
        assert usage.completion_tokens > 0 and text
        # Split KV caches (the default): batching changes no request's text, bit for bit.
        assert text == alone[i], (PROMPTS[i], text, alone[i])
    time.sleep(1.2)
    after = engine_stats(server)
    steps, tokens = after["steps"] - before["steps"], after["tokens"] - before["tokens"]
    # Served one at a time this would be one token per step; batched, several share a step.
    assert tokens / steps > 1.5, (steps, tokens)


def test_usage_reports_prompt_tokens_reused_from_the_cache(oai: openai.OpenAI) -> None:
    system = "You are a careful assistant. You answer in one short sentence, politely. " * 3

    def ask(question: str) -> Any:
        return oai.chat.completions.create(
            model="default", temperature=0, max_tokens=8,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        ).usage  # fmt: skip

    first, second = ask("What is two plus two?"), ask("Name a large animal.")
    assert second.prompt_tokens_details is not None
    assert second.prompt_tokens_details.cached_tokens >= 40
    assert second.prompt_tokens_details.cached_tokens > (first.prompt_tokens_details.cached_tokens or 0)
    assert second.prompt_tokens_details.cached_tokens < second.prompt_tokens


def test_a_client_leaving_mid_stream_frees_its_slot_while_others_go_on(
    server: Server, oai: openai.OpenAI
) -> None:
    def long_stream(i: int) -> str:
        text, _ = stream_text(oai, PROMPTS[i], max_tokens=60, extra_body={"ignore_eos": True})
        return text

    with ThreadPoolExecutor(3) as pool:
        others = [pool.submit(long_stream, i) for i in (1, 2)]
        leaving = oai.chat.completions.create(
            model="default", messages=[{"role": "user", "content": PROMPTS[0]}], stream=True,
            max_tokens=2000, extra_body={"ignore_eos": True},
        )  # fmt: skip
        got = 0
        for chunk in leaving:
            if chunk.choices and chunk.choices[0].delta.content:
                got += 1
                if got == 3:
                    break
        leaving.close()
        assert all(f.result(timeout=120) for f in others)
    deadline = time.monotonic() + 10
    while engine_stats(server)["running"] != 0:
        assert time.monotonic() < deadline, "the engine kept generating for a client that left"
        time.sleep(0.2)
