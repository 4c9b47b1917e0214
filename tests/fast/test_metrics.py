"""Metrics (issue 14): ``/metrics`` scraped before and after requests moves by exactly what the
requests did; every response is counted, the front's own errors included; no label value comes
from a request; ``/v1/metrics`` has the same figures as JSON; the admin routes. In process, over
a real engine process on the fake backend."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from starlette.testclient import TestClient

from axserving.app import create_app
from axserving.config import ModelConfig, Settings, load_traced, origin_kind, settings_report
from tests.fast.test_api import KEY, make_settings, ready_wait
from tests.prom import Series, delta, parse, settled


def scrape(c: TestClient) -> Series:
    return parse(c.get("/metrics", headers={"Authorization": ""}).text)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(make_settings()), headers={"Authorization": f"Bearer {KEY}"}) as c:
        ready_wait(c)
        yield c


@pytest.fixture(scope="module")
def oai(client: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client, max_retries=0)


M = {"model": "default"}
CHAT = "/v1/chat/completions"


def test_histograms_and_token_counters_move_by_exactly_the_requests(client: TestClient, oai: openai.OpenAI) -> None:
    before = scrape(client)
    usages = []
    for words in ("one two three", "alpha beta gamma delta epsilon"):  # not streamed
        r = oai.chat.completions.create(model="default", messages=[{"role": "user", "content": words}])
        assert r.usage is not None
        usages.append(r.usage)
    chunks = list(oai.chat.completions.create(  # streamed, with usage
        model="default", messages=[{"role": "user", "content": "a b c d e f"}], stream=True,
        stream_options={"include_usage": True},
    ))
    usage = chunks[-1].usage
    assert usage is not None
    usages.append(usage)
    c = oai.completions.create(model="default", prompt="x y", max_tokens=2)  # finish: length
    assert c.usage is not None
    usages.append(c.usage)
    after = settled(lambda: scrape(client), before, 4)

    n = len(usages)
    for name in ("axs_time_to_first_token_seconds", "axs_e2e_request_latency_seconds",
                 "axs_request_queue_time_seconds", "axs_request_prefill_time_seconds",
                 "axs_request_decode_time_seconds", "axs_time_per_output_token_seconds",
                 "axs_request_prompt_tokens", "axs_request_generation_tokens"):
        assert delta(before, after, name + "_count", **M) == n, name
        assert delta(before, after, name + "_bucket", le="+Inf", **M) == n, name
    completion = sum(u.completion_tokens for u in usages)
    prompt = sum(u.prompt_tokens for u in usages)
    assert delta(before, after, "axs_generation_tokens_total", **M) == completion
    assert delta(before, after, "axs_prompt_tokens_total", **M) == prompt
    assert delta(before, after, "axs_request_prompt_tokens_sum", **M) == prompt
    assert delta(before, after, "axs_request_generation_tokens_sum", **M) == completion
    # One inter-token gap per token after each request's first.
    assert delta(before, after, "axs_inter_token_latency_seconds_count", **M) == completion - n
    assert delta(before, after, "axs_request_finish_total", reason="stop", **M) == 3
    assert delta(before, after, "axs_request_finish_total", reason="length", **M) == 1
    assert delta(before, after, "axs_requests_total", endpoint=CHAT, status="200", **M) == 3
    assert delta(before, after, "axs_requests_total", endpoint="/v1/completions", status="200", **M) == 1
    assert after[("axs_requests_running", frozenset(M.items()))] == 0


def test_every_response_is_counted_the_fronts_own_errors_too(client: TestClient) -> None:
    before = scrape(client)
    assert client.post(CHAT, json={"messages": []}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post(CHAT, json={"messages": []}, headers={"Authorization": ""}).status_code == 401
    assert client.post(CHAT, content=b"{not json").status_code == 400
    assert client.post(CHAT, json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}).status_code == 404
    assert client.get("/v1/no/such/route").status_code == 404
    assert client.delete("/v1/metrics").status_code == 405
    assert client.get("/v1/models").status_code == 200
    after = scrape(client)
    assert delta(before, after, "axs_requests_total", model="", endpoint=CHAT, status="401") == 2
    assert delta(before, after, "axs_requests_total", model="", endpoint=CHAT, status="400") == 1
    assert delta(before, after, "axs_requests_total", model="", endpoint=CHAT, status="404") == 1
    assert delta(before, after, "axs_requests_total", model="", endpoint="unmatched", status="404") == 1
    assert delta(before, after, "axs_requests_total", model="", endpoint="/v1/metrics", status="405") == 1
    assert delta(before, after, "axs_requests_total", model="", endpoint="/v1/models", status="200") == 1


def test_no_label_value_comes_from_a_request(client: TestClient) -> None:
    """Random model names, paths, request ids and keys: none becomes a label value, and a second
    round of new random values adds no series at all."""
    def noise() -> list[str]:
        tokens = [uuid.uuid4().hex for _ in range(4)]
        model, path, rid, key = tokens
        client.post(CHAT, json={"model": model, "messages": [{"role": "user", "content": "x"}]},
                    headers={"X-Request-ID": rid})
        client.get(f"/v1/{path}")
        client.get(f"/v1/models/{model}")
        client.post(CHAT, json={"messages": []}, headers={"Authorization": f"Bearer {key}"})
        client.post(CHAT, json={"messages": [{"role": "user", "content": "x"}], "user": path},
                    headers={"X-Request-ID": rid})
        return tokens

    noise()
    first = scrape(client)
    tokens = noise()
    second = scrape(client)
    assert set(first) == set(second), set(second) - set(first)
    values = {v for _, labels in second for _, v in labels}
    assert not any(t in v for t in tokens for v in values)
    allowed = {"model", "endpoint", "status", "reason", "le", "state"}
    assert {k for _, labels in second for k, _ in labels} <= allowed
    assert len(second) < 600  # a fixed, small set


def test_v1_metrics_json_has_percentiles_models_and_timeline(client: TestClient, oai: openai.OpenAI) -> None:
    oai.chat.completions.create(model="default", messages=[{"role": "user", "content": "p q r"}])
    settled(lambda: scrape(client), {}, 1)
    body = client.get("/v1/metrics", headers={"Authorization": ""}).json()  # open, like /metrics
    assert body["object"] == "metrics"
    for key in ("ttft_us", "e2e_us", "queue_wait_us", "tpot_us", "itl_us"):
        q = body["latency"][key]
        assert set(q) == {"count", "p50", "p95", "p99", "mean"}
        assert q["count"] >= 1 and 0 < q["p50"] <= q["p95"] <= q["p99"], (key, q)
    (model,) = body["models"]
    assert model["id"] == "default" and model["state"] == "ready"
    assert model["latency"]["ttft_us"]["count"] >= 1
    assert 0 <= model["kv_cache_usage"] <= 1 and model["max_batch"] >= 1
    assert body["scheduler"]["queue_depth"] == 0
    assert body["totals"]["generation_tokens"] >= 3
    assert body["rss_bytes"] > 10 << 20
    assert isinstance(body["timeline"], list) and body["tick_secs"] > 0


def test_admin_routes_refuse_without_a_key_and_answer_with_one(client: TestClient) -> None:
    for path in ("/v1/admin/status", "/v1/admin/startup-report", "/v1/admin/diagnostics", "/v1/admin/policy",
                 "/v1/admin/audit"):
        assert client.get(path, headers={"Authorization": ""}).status_code == 401, path
        assert client.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401, path
        assert client.get(path).status_code == 200, path
    diag = client.get("/v1/admin/diagnostics").json()
    assert set(diag) >= {"health", "metrics", "models", "engines", "audit"}
    policy = client.get("/v1/admin/policy").json()
    assert policy["auth"]["required"] is True and policy["auth"]["keys"] == 2
    assert policy["admission"]["overload_policy"] == "queue"


def test_license_is_open_and_says_open_source(client: TestClient) -> None:
    r = client.get("/v1/license", headers={"Authorization": ""})
    assert r.status_code == 200 and r.json()["edition"] == "open_source"
    assert client.post("/v1/license", json={"key": "x"}, headers={"Authorization": ""}).status_code == 401
    refused = client.post("/v1/license", json={"key": "x"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "license_not_required"


def test_the_startup_report_names_the_source_of_every_value(tmp_path: Path) -> None:
    cfg = tmp_path / "serving.yaml"
    cfg.write_text("scheduler:\n  max_queue: 7\nlogging:\n  level: debug\n")
    env = {"AXS_REST_PORT": "19999", "AXS_API_KEY": "sk-secret-1,sk-secret-22", "AXS_ALLOW_NO_AUTH": "false"}
    settings, sources = load_traced({"model_defaults.threads": 3}, env=env, config_path=str(cfg),
                                    flags={"model_defaults.threads": "--threads"})
    rows = {r["key"]: r for r in settings_report(settings, sources)}
    assert rows["model_defaults.threads"] == {"key": "model_defaults.threads", "value": 3, "source": "flag",
                                              "origin": "--threads"}
    assert rows["rest.port"]["source"] == "env" and rows["rest.port"]["origin"] == "$AXS_REST_PORT"
    assert rows["scheduler.max_queue"]["source"] == "file" and rows["scheduler.max_queue"]["origin"] == str(cfg)
    assert rows["scheduler.max_inflight"]["source"] == "default" and rows["scheduler.max_inflight"]["origin"] is None
    assert rows["api_keys"]["source"] == "env"
    assert "sk-secret" not in repr(rows) and rows["api_keys"]["value"] == ["***(11 chars)", "***(12 chars)"]
    assert all(r["source"] in {"flag", "env", "file", "default"} for r in rows.values())
    assert {"rest.host", "models.0.id", "engine.max_restarts", "logging.format"} <= set(rows)
    assert origin_kind("command line") == "flag"


def test_the_startup_report_route(tmp_path: Path) -> None:
    settings = Settings(models=(ModelConfig(id="default", path="fake://echo", backend="fake"),), api_keys=(KEY,))
    app = create_app(settings, sources={"models": "config.yaml", "api_keys": "$AXS_API_KEY"})
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as c:
        body = c.get("/v1/admin/startup-report").json()
    rows = {r["key"]: r for r in body["settings"]}
    assert rows["models.0.backend"]["source"] == "file"
    assert rows["rest.port"]["source"] == "default"
    assert KEY not in str(body)
    assert body["sources"]["file"] >= 1 and body["precedence"] == ["flag", "env", "file", "default"]
