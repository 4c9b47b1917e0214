"""Slow tier: the metrics of a real `axserving run` on SmolLM2 (llama.cpp, then MLX): the
scrape moves by exactly the requests' usage, the engine's own gauges (KV cache use, batch
occupancy, RSS) come through its stats records, and ``/v1/metrics`` agrees with them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.prom import Series, delta, parse, settled
from tests.server import BACKENDS, Server, openai_client, run_smollm, smollm_on

pytestmark = pytest.mark.slow
M = {"model": "default"}


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    backend, model = smollm_on(request)
    with run_smollm(tmp_path_factory.mktemp("metrics"), model, backend) as s:
        yield s


def scrape(s: Server) -> Series:
    return parse(httpx.get(s.url + "/metrics", timeout=10).text)


def test_counters_and_histograms_move_by_exactly_the_requests(server: Server) -> None:
    oai = openai_client(server)
    before = scrape(server)
    usages = []
    for i in range(3):
        r = oai.chat.completions.create(model="default", max_tokens=12 + i, temperature=0,
                                        messages=[{"role": "user", "content": f"Count to {i + 3}."}])
        assert r.usage is not None
        usages.append(r.usage)
    stream = list(oai.chat.completions.create(model="default", max_tokens=10, stream=True, temperature=0,
                                              stream_options={"include_usage": True},
                                              messages=[{"role": "user", "content": "Name a colour."}]))
    assert stream[-1].usage is not None
    usages.append(stream[-1].usage)
    after = settled(lambda: scrape(server), before, 4)
    n = len(usages)
    for name in ("axs_time_to_first_token_seconds", "axs_e2e_request_latency_seconds",
                 "axs_request_queue_time_seconds", "axs_request_prefill_time_seconds",
                 "axs_request_decode_time_seconds", "axs_time_per_output_token_seconds"):
        assert delta(before, after, name + "_count", **M) == n, name
    completion = sum(u.completion_tokens for u in usages)
    assert delta(before, after, "axs_generation_tokens_total", **M) == completion
    assert delta(before, after, "axs_prompt_tokens_total", **M) == sum(u.prompt_tokens for u in usages)
    cached = sum((u.prompt_tokens_details.cached_tokens or 0) if u.prompt_tokens_details else 0 for u in usages)
    assert delta(before, after, "axs_prompt_tokens_cached_total", **M) == cached
    assert delta(before, after, "axs_inter_token_latency_seconds_count", **M) == completion - n
    assert delta(before, after, "axs_requests_total", endpoint="/v1/chat/completions", status="200", **M) == n
    assert after[("axs_engine_rss_bytes", frozenset(M.items()))] > 50 << 20  # the model is mapped in
    assert after[("axs_rss_bytes", frozenset())] > 20 << 20


def test_engine_gauges_show_a_running_batch(server: Server) -> None:
    """While four long generations run, the engine's stats (sent about once a second) report
    them: running sequences, batch occupancy and KV-cache use above zero."""
    oai = openai_client(server)
    errors: list[BaseException] = []
    backend = server.status()["models"][0]["backend"]
    long = 400 if backend == "llama_cpp" else 40  # MLX's reference CPU path: about 2 tokens/s a stream

    def one(i: int) -> None:
        try:
            oai.chat.completions.create(model="default", max_tokens=long, temperature=0.7, seed=i,
                                        extra_body={"ignore_eos": True},
                                        messages=[{"role": "user", "content": f"Tell a long story number {i}."}])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    seen: dict[str, float] = {}
    end = time.monotonic() + 20
    while time.monotonic() < end and len(seen) < 3:
        s = scrape(server)
        for name in ("axs_kv_cache_usage_perc", "axs_batch_occupancy", "axs_engine_running_sequences"):
            value = s.get((name, frozenset(M.items())), 0.0)
            if value > 0:
                seen[name] = value
        time.sleep(0.2)
    body = httpx.get(server.url + "/v1/metrics", timeout=10).json()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert set(seen) == {"axs_kv_cache_usage_perc", "axs_batch_occupancy", "axs_engine_running_sequences"}, seen
    assert 0 < seen["axs_kv_cache_usage_perc"] <= 1 and 0 < seen["axs_batch_occupancy"] <= 1
    (model,) = body["models"]
    assert model["rss_bytes"] > 50 << 20 and model["backend"] == backend
