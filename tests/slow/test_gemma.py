"""Slow tier on the second real model: Gemma 3 270M base (sliding-window attention layers, no chat
template in its metadata), in the batched backend directly and through `axserving run`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from engine_proc.backends.base import BackendConfig, RequestRejected
from engine_proc.backends.llama_cpp import LlamaCppBackend
from ipc.records import ChatMessage, SamplingParams, Submit
from tests.batching import agree, run, text
from tests.server import Server, run_server

pytestmark = pytest.mark.slow

SPAIN = "The capital of France is Paris. The capital of Spain is"
PROMPTS = (
    SPAIN,
    "Elephants are large animals that",
    "A computer keyboard is",
    "In the morning, the market",
)
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def backend(gemma_model: Path) -> Iterator[LlamaCppBackend]:
    b = LlamaCppBackend(BackendConfig(model_path=str(gemma_model), n_ctx=2048, n_threads=2, max_batch=4))
    b.load()
    yield b
    b.close()





def test_batched_completions_keep_their_own_text(backend: LlamaCppBackend) -> None:
    alone = [text(run(backend, [Submit(10 + i, GREEDY, prompt=p)])[10 + i]) for i, p in enumerate(PROMPTS)]
    together = run(backend, [Submit(20 + i, GREEDY, prompt=p) for i, p in enumerate(PROMPTS)])
    # Attention is per sequence (split KV), yet on this model batched decoding rounds
    # differently from a lone one (measured: with or without llama.cpp's weight repacking), so
    # a greedy reply may fork early. It must stay its own: closer to its lone reply than to any
    # other request's.
    for i in range(len(PROMPTS)):
        batched = text(together[20 + i])
        own = agree(batched, alone[i])
        assert own >= 1 and all(own > agree(batched, alone[j]) for j in range(len(PROMPTS)) if j != i), (
            PROMPTS[i], batched, alone[i],
        )  # fmt: skip
    assert "Madrid" in alone[0]


def test_a_prompt_longer_than_the_sliding_window_is_reused_whole(backend: LlamaCppBackend) -> None:
    prompt = "Once upon a time in a quiet village there lived a baker. " * 60 + "The baker"
    first = run(backend, [Submit(30, GREEDY, prompt=prompt)])[30]
    again = run(backend, [Submit(31, GREEDY, prompt=prompt)])[31]
    assert first[-1].prompt_tokens > 700  # beyond Gemma 3's 512-token attention window
    assert again[-1].cached_tokens == again[-1].prompt_tokens - 1
    assert text(again) == text(first)


def test_chat_is_refused_clearly_without_a_template(backend: LlamaCppBackend) -> None:
    with pytest.raises(RequestRejected) as info:
        backend.submit(Submit(40, GREEDY, messages=(ChatMessage("user", "hi"),)))
    assert info.value.code == "invalid_request" and "/v1/completions" in info.value.message


@pytest.fixture(scope="module")
def server(gemma_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("gemma")
    with run_server(tmp, "--model", str(gemma_model), "--threads", "2", "--ctx-size", "2048",
                    ready_timeout=180) as s:  # fmt: skip
        yield s


def test_the_server_completes_on_gemma_and_refuses_chat_with_a_400(server: Server) -> None:
    oai = openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=120)
    r = oai.completions.create(model="default", prompt=SPAIN, max_tokens=8, temperature=0)
    assert "Madrid" in r.choices[0].text
    assert r.usage is not None and r.usage.prompt_tokens > 3
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
    resp = httpx.post(f"{server.v1}/chat/completions", json=body, headers=server.headers(), timeout=60)
    assert resp.status_code == 400
    assert "/v1/completions" in resp.json()["error"]["message"]
