"""The HTTP API in-process (Starlette TestClient + the official openai client) over a real
engine process on the fake backend."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from starlette.testclient import TestClient

from axserving.app import create_app
from axserving.config import ModelConfig, Settings

KEY = "sk-test-1"


def make_settings(**model: object) -> Settings:
    fields: dict[str, object] = {"id": "default", "path": "fake://echo", "backend": "fake", "ctx_size": 256}
    fields.update(model)
    return Settings(models=(ModelConfig(**fields),), api_keys=(KEY, "sk-test-2"))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(make_settings()), headers={"Authorization": f"Bearer {KEY}"}) as c:
        ready_wait(c)
        yield c


def ready_wait(c: TestClient, timeout: float = 20) -> None:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if c.get("/readyz").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"not ready: {c.get('/health').json()}")


@pytest.fixture(scope="module")
def oai(client: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client, max_retries=0)


def err(resp) -> dict:  # type: ignore[no-untyped-def,type-arg]
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]  # type: ignore[no-any-return]


# ---- happy paths ------------------------------------------------------------------------------


def test_chat_non_streaming(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model="default", messages=[{"role": "user", "content": "one two three"}])
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "one two three "
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens == 3
    assert r.usage.total_tokens == r.usage.prompt_tokens + 3


def test_chat_streaming_with_usage(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "alpha beta gamma delta"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "alpha beta gamma delta "
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


def test_max_tokens_gives_length(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(
        model="default", max_tokens=2, messages=[{"role": "user", "content": "a b c d e"}]
    )
    assert r.choices[0].message.content == "a b "
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 2


def test_stop_string_not_emitted(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(
        model="default", stop=["STOP"], messages=[{"role": "user", "content": "keep this STOP not this"}]
    )
    assert r.choices[0].message.content == "keep this "
    assert r.choices[0].finish_reason == "stop"


def test_completions(oai: openai.OpenAI) -> None:
    r = oai.completions.create(model="default", prompt="x y z")
    assert r.object == "text_completion"
    assert r.choices[0].text == "x y z "
    assert r.usage is not None and r.usage.prompt_tokens == 3
    streamed = "".join(c.choices[0].text for c in oai.completions.create(model="default", prompt="p q", stream=True))
    assert streamed == "p q "


def test_models_and_unprefixed_routes(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["default"]
    assert {"id", "object", "created", "owned_by"} <= set(body["data"][0])
    unprefixed = client.get("/models").json()
    for m in (*body["data"], *unprefixed["data"]):
        del m["engine"]  # live figures (heartbeat age) differ from one call to the next
    assert unprefixed == body
    r = client.post("/chat/completions", json={"model": "default", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200


def test_headers(client: TestClient) -> None:
    r = client.get("/v1/models", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    assert len(client.get("/health").headers["x-request-id"]) == 32
    r = client.post("/v1/chat/completions", json={"model": "default", "messages": [{"role": "user", "content": "hi"}]})
    assert r.headers["x-ax-stage-timing"].startswith("queue_wait_us=")


def test_a_request_without_model_is_served_by_the_default_model(oai: openai.OpenAI, client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "no model named"}]})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "default" and r.json()["choices"][0]["message"]["content"] == "no model named "
    r = client.post("/v1/completions", json={"prompt": "plain text"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "plain text "


def test_health_and_probes(client: TestClient) -> None:
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["ready"] is True and h["model_available"] is True
    assert h["loaded_models"] == ["default"] and h["loaded_model_count"] == 1
    assert h["models"] == [{"id": "default", "state": "ready", "aliases": [], "running": 0, "waiting": 0, "restarts": 0}]
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").json()["ready"] is True
    # Paths, pids and errors are for authenticated eyes only.
    engine = client.get("/v1/admin/status").json()["models"][0]["engine"]
    assert engine["state"] == "ready" and engine["pid"] > 0 and engine["restarts"] == 0
    assert engine["max_batch"] == 8 and engine["kv_unified"] is False and engine["prefill_slowdown"] == 4.0
    assert engine["prefill_stall_ms"] == 500 and engine["flash_attn"] == "auto" and engine["draft_tokens"] == 0
    assert engine["drafted_tokens_total"] == 0 and engine["kept_tokens_total"] == 0


def test_metrics_open_and_counting(client: TestClient) -> None:
    client.post("/v1/chat/completions", json={"model": "default", "messages": [{"role": "user", "content": "m"}]})
    text = client.get("/metrics", headers={"Authorization": ""}).text
    assert 'axs_requests_total{endpoint="/v1/chat/completions",model="default",status="200"}' in text
    assert "axs_time_to_first_token_seconds_bucket" in text
    assert 'axs_engine_up{model="default"} 1.0' in text
    assert 'axs_num_preemptions_total{model="default"} 0.0' in text
    assert 'axs_spec_decode_accepted_tokens_total{model="default"} 0.0' in text


# ---- bad input --------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "default"}, 400, "messages"),
        ({"model": None, "messages": [{"role": "user", "content": "x"}], "n": 17}, 400, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "sound"}}, 400, "response_format.type"),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}, 400,
         "response_format.json_schema.schema"),
        ({"messages": [{"role": "user", "content": "x"}],
          "response_format": {"type": "json_schema", "json_schema": {"name": "a", "strict": True,
                                                                     "schema": {"type": "object", "x-foo": 1, "properties": {"a": {"type": "strin"}}}}}},
         400, "response_format.json_schema.schema"),
        ({"messages": [{"role": "user", "content": "x"}], "grammar": "root ::= nope"}, 400, "grammar"),
        ({"messages": [{"role": "user", "content": "x"}], "grammar": 'root ::= "a"', "response_format": {"type": "json_object"}},
         400, "grammar"),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, 400, "tool_choice"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "retrieval", "function": {"name": "f"}}]},
         400, "tools[0].type"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "a b"}}]},
         400, "tools[0].function.name"),
        ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}}, 400, "logit_bias"),
        ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 300}}, 400, "logit_bias"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
         "messages[0].content[0].type"),
        ({"messages": [{"role": "tool", "content": "42"}]}, 400, "messages[0].tool_call_id"),
        ({"messages": [{"role": "user", "content": "x"}], "modalities": ["text", "audio"]}, 400, "modalities"),
        ({"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]}, 400, "functions"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "[1"}}]}]},
         400, "messages[0].tool_calls[0].function.arguments"),
        ({"model": "default", "messages": "hello"}, 400, "messages"),
        ({"model": "default", "messages": []}, 400, "messages"),
        ({"model": "default", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
        ({"model": "default", "messages": [{"content": "x"}]}, 400, "messages[0].role"),
        ({"model": 7, "messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        ({"model": "default", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
        ({"model": "default", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
        ({"model": "default", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "default", "messages": [{"role": "user", "content": "x"}], "max_tokens": 40000}, 400, "max_tokens"),
        ({"model": "default", "messages": [{"role": "user", "content": "x"}], "temperature": 2.5}, 422, "temperature"),
        ({"model": "default", "messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, 422, "top_p"),
        ({"model": "default", "messages": [{"role": "user", "content": "x"}], "top_k": 0}, 422, "top_k"),
        ({"model": "default", "messages": [{"role": "user", "content": "x"}], "repeat_penalty": 0}, 422, "repeat_penalty"),
        ({"model": "default", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 3}, 422, "presence_penalty"),
        ({"model": "default", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
        ({"model": "", "messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        ({"model": "bad model!", "messages": [{"role": "user", "content": "x"}]}, 422, "model"),
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
        ({"model": "default", "messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
    ],
)
def test_bad_chat_bodies(client: TestClient, body: dict, status: int, param: str) -> None:  # type: ignore[type-arg]
    r = client.post(CHAT, json=body)
    assert r.status_code == status, r.text
    e = err(r)
    assert e["param"] == param, e
    assert e["type"] in ("invalid_request_error", "not_found_error")
    if status == 404:
        assert e["code"] == "model_not_found"


@pytest.mark.parametrize("raw", [b"{bad json", b"", b"[1, 2]", b"null", "{\"model\": \"caf\xe9\"}".encode("latin-1")])
def test_malformed_json(client: TestClient, raw: bytes) -> None:
    r = client.post(CHAT, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert err(r)["type"] == "invalid_request_error"


def test_unknown_route_and_method(client: TestClient) -> None:
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and err(r)["type"] == "not_found_error"
    r = client.get(CHAT)
    assert r.status_code == 405 and err(r)["type"] == "invalid_request_error"


def test_context_length_exceeded_streaming_and_not(client: TestClient) -> None:
    long = " ".join(["word"] * 300)  # the fixture's context is 256 "tokens"
    for stream in (False, True):
        r = client.post(CHAT, json={"model": "default", "stream": stream, "messages": [{"role": "user", "content": long}]})
        assert r.status_code == 400, r.text
        assert err(r)["code"] == "context_length_exceeded"


# ---- auth -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "auth", [None, "Bearer wrong", "Basic c2stdGVzdC0x", "Bearer", f"Bearer {KEY}x", f"bearer{KEY}"]
)
def test_auth_rejected(client: TestClient, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth is not None else {"Authorization": ""}
    r = client.get("/v1/models", headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    e = err(r)
    assert e["type"] == "authentication_error" and e["code"] == "invalid_api_key"


def test_second_key_and_open_paths(client: TestClient) -> None:
    assert client.get("/v1/models", headers={"Authorization": "Bearer sk-test-2"}).status_code == 200
    for path in ("/health", "/livez", "/readyz", "/metrics"):
        assert client.get(path, headers={"Authorization": ""}).status_code == 200, path
    assert client.get("/v1/admin/status", headers={"Authorization": ""}).status_code == 401


def test_openai_client_sees_typed_errors(client: TestClient) -> None:
    bad = openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=client, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        good.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.UnprocessableEntityError):
        good.chat.completions.create(model="default", temperature=3, messages=[{"role": "user", "content": "x"}])


def test_stop_string_split_across_tokens(oai: openai.OpenAI) -> None:
    """The fake emits one word per token, so "two thr" spans two tokens: it must never show."""
    chunks = oai.chat.completions.create(
        model="default", stop=["o thr"], stream=True,
        messages=[{"role": "user", "content": "one two three four"}],
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one tw"


def test_large_prompt_goes_through_blob_and_body_limit_is_413(client: TestClient) -> None:
    # Over a quarter of the 4 MiB rings (so a blob segment each way), under the 8 MiB body limit.
    big = "x" * (2 << 20)
    r = client.post(CHAT, json={"model": "default", "messages": [{"role": "user", "content": big}]})
    assert r.status_code == 200, r.text[:300]
    assert r.json()["choices"][0]["message"]["content"] == big + " "
    r = client.post(CHAT, content=b"{" + b" " * (9 << 20) + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.post(CHAT, json={"model": "default", "messages": [{"role": "user", "content": "ok"}]}).status_code == 200


def test_completion_prompt_as_token_ids(client: TestClient) -> None:
    for prompt in ([5, 6, 7], [[5, 6, 7]]):
        r = client.post("/v1/completions", json={"model": "default", "prompt": prompt})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == "t5 t6 t7 "
        assert r.json()["usage"]["prompt_tokens"] == 3
    for bad in ([], [1, "a"], [-1], [1.5], [[1], [2]], ["a", "b"], [2**40]):
        r = client.post("/v1/completions", json={"model": "default", "prompt": bad})
        assert r.status_code == 400, (bad, r.text)
        assert err(r)["param"] == "prompt"


def test_values_the_engine_cannot_carry_and_deep_json_are_400s(client: TestClient) -> None:
    """Found probing (issue 12): a seed past 64 bits and JSON nested 50,000 deep were 500s."""
    head = '{"model": "default", "messages": [{"role": "user", "content": "x"}], '
    for extra, param in (('"seed": 18446744073709551617', "seed"), ('"seed": -9223372036854775809', "seed"),
                         ('"top_k": 1000000000000000000000', "top_k")):
        r = client.post(CHAT, content=(head + extra + "}").encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400 and err(r)["param"] == param, r.text
    for deep in ("[" * 50_000 + "]" * 50_000, '{"a":' * 50_000 + "1" + "}" * 50_000):
        r = client.post(CHAT, content=(head + '"extra": ' + deep + "}").encode(),
                        headers={"content-type": "application/json"})
        assert r.status_code == 400 and "nested too deeply" in err(r)["message"], r.text
    ok = client.post(CHAT, json={"model": "default", "seed": 2**63 - 1, "messages": [{"role": "user", "content": "s"}]})
    assert ok.status_code == 200


# ---- the generation surface on the fake backend (the shared output layer behind real rings) -------

CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def test_n_choices_streaming_and_not(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(messages=[{"role": "user", "content": "a b c"}], n=3, model="default")
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content == "a b c " and c.finish_reason == "stop" for c in r.choices)
    assert r.usage is not None and r.usage.completion_tokens == 9
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for chunk in oai.chat.completions.create(messages=[{"role": "user", "content": "a b c"}], n=2, stream=True, model="default"):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {0: "a b c ", 1: "a b c "} and finishes == {0: "stop", 1: "stop"}


def test_logprobs_shape_streaming_and_not(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(messages=[{"role": "user", "content": "x y"}], logprobs=True, top_logprobs=2, model="default")
    lps = r.choices[0].logprobs
    assert lps is not None and lps.content is not None
    assert "".join(t.token for t in lps.content) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode()) for t in lps.content)
    streamed = [t for ch in oai.chat.completions.create(messages=[{"role": "user", "content": "x y"}], logprobs=True,
                                                         stream=True, model="default")
                for c in ch.choices if c.logprobs and c.logprobs.content for t in c.logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in lps.content]
    assert all(t.top_logprobs == [] for t in streamed)
    plain = oai.chat.completions.create(messages=[{"role": "user", "content": "x y"}], model="default")
    assert plain.choices[0].logprobs is None


def test_completion_legacy_logprobs_and_echo(oai: openai.OpenAI) -> None:
    r = oai.completions.create(model="default", prompt="p q r", logprobs=1)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens == ["p ", "q ", "r "] and lp.text_offset == [0, 2, 4]
    assert lp.top_logprobs is not None and all(len(t) == 1 for t in lp.top_logprobs)
    e = oai.completions.create(model="default", prompt="p q", echo=True)
    assert e.choices[0].text == "p q p q "


def test_tool_calls_parsed_streamed_and_reassembled(oai: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": f"ok {CALL}"}]
    r = oai.chat.completions.create(model="default", messages=msgs, tools=TOOLS)  # type: ignore[arg-type]
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "ok "
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.type == "function" and call.function.name == "get_weather"  # type: ignore[union-attr]
    assert call.function.arguments == '{"city": "Paris"}'  # type: ignore[union-attr]
    parts: dict[int, dict[str, str]] = {}
    finish = None
    content = ""
    for ch in oai.chat.completions.create(model="default", messages=msgs, tools=TOOLS, stream=True):  # type: ignore[arg-type]
        d = ch.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            p = parts.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            p["id"] += tc.id or ""
            p["name"] += (tc.function.name or "") if tc.function else ""
            p["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == "ok "
    assert [(p["name"], p["arguments"]) for p in parts.values()] == [("get_weather", '{"city": "Paris"}')]
    assert parts[0]["id"].startswith("call_")
    # tool_choice none: no parsing, the text is the text
    r = oai.chat.completions.create(model="default", messages=msgs, tools=TOOLS, tool_choice="none")  # type: ignore[arg-type]
    assert r.choices[0].message.tool_calls is None and "<tool_call>" in (r.choices[0].message.content or "")


def test_a_tool_round_trip_is_accepted(oai: openai.OpenAI) -> None:
    msgs = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    r = oai.chat.completions.create(model="default", messages=msgs, tools=TOOLS)  # type: ignore[arg-type]
    assert r.choices[0].finish_reason == "stop"


def test_the_fake_refuses_a_grammar_clearly(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}],
                                    response_format={"type": "json_object"})
    assert "constrain" in e.value.message


def test_model_may_be_omitted(client: TestClient) -> None:
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["model"] == "default"


def test_n_above_the_batch_is_a_400_naming_n(client: TestClient) -> None:
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "n": 16})
    assert r.status_code == 400 and err(r)["param"] == "n"


# ---- tokenize, detokenize, apply-template ------------------------------------------------------------


def test_tokenize_detokenize_and_apply_template(client: TestClient) -> None:
    r = client.post("/tokenize", json={"content": "hello big world"})
    assert r.status_code == 200, r.text
    ids = r.json()["tokens"]
    assert len(ids) == 3 and all(isinstance(t, int) for t in ids)
    pieces = client.post("/tokenize", json={"content": "hello big world", "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == ids and [p["piece"] for p in pieces] == ["hello ", "big ", "world "]
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"content": "hello big world "}
    chat = client.post("/v1/tokenize", json={"messages": [{"role": "user", "content": "hi there"}]}).json()
    assert len(chat["tokens"]) >= 2
    prompt = client.post("/apply-template", json={"messages": [{"role": "user", "content": "hi"}]}).json()["prompt"]
    assert "hi" in prompt
    tools = [{"type": "function", "function": {"name": "f", "description": "does f"}}]
    with_tools = client.post("/apply-template", json={"messages": [{"role": "user", "content": "hi"}], "tools": tools})
    assert '"name": "f"' in with_tools.json()["prompt"]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/tokenize", {}, "content"),
    ("/tokenize", {"content": "x", "messages": [{"role": "user", "content": "x"}]}, "content"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": [999999999]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
    ("/apply-template", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("/tokenize", {"content": "x", "model": "nope"}, "model"),
])
def test_utility_routes_refuse_bad_input_naming_the_field(client: TestClient, path: str, body: dict, param: str) -> None:  # type: ignore[type-arg]
    r = client.post(path, json=body)
    assert 400 <= r.status_code < 500, r.text
    assert err(r)["param"] == param


# ---- Anthropic's Messages API --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def claude(client: TestClient) -> Any:
    import anthropic

    return anthropic.Anthropic(base_url="http://testserver", api_key=KEY, http_client=client, max_retries=0)


def test_messages_reply_and_stream(claude: Any) -> None:
    msg = claude.messages.create(model="default", max_tokens=50, system="Be brief.",
                                 messages=[{"role": "user", "content": "one two three"}])
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == "one two three "
    assert msg.stop_reason == "end_turn" and msg.usage.output_tokens == 3 and msg.usage.input_tokens > 0
    cut = claude.messages.create(model="default", max_tokens=2, messages=[{"role": "user", "content": "a b c d"}])
    assert cut.stop_reason == "max_tokens"
    stopped = claude.messages.create(model="default", max_tokens=20, stop_sequences=["c"],
                                     messages=[{"role": "user", "content": "a b c d"}])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "c"
    with claude.messages.stream(model="default", max_tokens=50, messages=[{"role": "user", "content": "x y z"}]) as s:
        events = [e.type for e in s]
        final = s.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "content_block_start" in events and "content_block_stop" in events and "message_delta" in events
    assert final.content[0].text == "x y z " and final.stop_reason == "end_turn"


def test_messages_tool_use_round_trip(claude: Any) -> None:
    tools = [{"name": "get_weather", "description": "weather", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    msg = claude.messages.create(model="default", max_tokens=80, tools=tools,
                                 messages=[{"role": "user", "content": f"ok {CALL}"}])
    assert msg.stop_reason == "tool_use"
    use = [b for b in msg.content if b.type == "tool_use"][0]
    assert use.name == "get_weather" and use.input == {"city": "Paris"}
    with claude.messages.stream(model="default", max_tokens=80, tools=tools,
                                messages=[{"role": "user", "content": f"ok {CALL}"}]) as s:
        final = s.get_final_message()
    streamed = [b for b in final.content if b.type == "tool_use"][0]
    assert (streamed.name, streamed.input) == (use.name, use.input) and final.stop_reason == "tool_use"
    back = claude.messages.create(model="default", max_tokens=40, tools=tools, messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]},
    ])
    assert back.stop_reason == "end_turn"


def test_messages_count_tokens_and_errors(claude: Any, client: TestClient) -> None:
    import anthropic

    n = claude.messages.count_tokens(model="default", messages=[{"role": "user", "content": "hello big world"}])
    assert n.input_tokens > 0
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="default", max_tokens=0, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    r = client.post("/v1/messages", json={"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # Empty content (found by the fuzzer: the conversation reached the engine empty, a 500).
    for conversation in ([{"role": "user", "content": []}],
                         [{"role": "user", "content": "hi"}, {"role": "user", "content": []}],
                         [{"role": "assistant", "content": []}],
                         [{"role": "user", "content": [{"type": "thinking", "thinking": "t", "signature": "s"}]}]):
        r = client.post("/v1/messages", json={"max_tokens": 1, "messages": conversation})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (conversation, r.text)
    ok = client.post("/v1/messages", json={"max_tokens": 1, "messages": [  # a final assistant turn may be empty
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": []}]})
    assert ok.status_code == 200, ok.text
    r = client.post("/v1/messages", json={"max_tokens": 5}, headers={"Authorization": ""})
    assert r.status_code == 401 and r.json() == {"type": "error", "error": {
        "type": "authentication_error", "message": r.json()["error"]["message"]}}
    ok = client.post("/v1/messages", json={"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
                     headers={"Authorization": "", "x-api-key": KEY})
    assert ok.status_code == 200, ok.text
    assert client.post("/v1/messages", json={"max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
                                             "model": "nope"}).json()["error"]["type"] == "not_found_error"


# ---- the Responses API ---------------------------------------------------------------------------------


def test_responses_non_streaming_and_streaming(oai: openai.OpenAI) -> None:
    r = oai.responses.create(model="default", input="one two three", instructions="Be brief.")
    assert r.id.startswith("resp_") and r.status == "completed" and r.object == "response"
    assert r.output_text == "one two three " and r.output[0].type == "message" and r.output[0].id.startswith("msg_")
    assert r.usage is not None and r.usage.output_tokens == 3
    cut = oai.responses.create(model="default", input="a b c d", max_output_tokens=2)
    assert cut.status == "incomplete" and cut.incomplete_details and cut.incomplete_details.reason == "max_output_tokens"
    events = list(oai.responses.create(model="default", input="x y z", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    for k in ("response.output_item.added", "response.content_part.added", "response.output_text.delta",
              "response.output_text.done", "response.output_item.done"):
        assert k in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "x y z "
    assert events[-1].response.output_text == "x y z "  # type: ignore[union-attr]


def test_responses_function_call_round_trip(oai: openai.OpenAI) -> None:
    tools = [{"type": "function", "name": "get_weather", "parameters": TOOLS[0]["function"]["parameters"]}]
    r = oai.responses.create(model="default", input=f"ok {CALL}", tools=tools)  # type: ignore[arg-type]
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].arguments == '{"city": "Paris"}'
    assert calls[0].id.startswith("fc_") and calls[0].call_id.startswith("call_")
    events = list(oai.responses.create(model="default", input=f"ok {CALL}", tools=tools, stream=True))  # type: ignore[arg-type]
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert args == calls[0].arguments
    follow = oai.responses.create(model="default", tools=tools, input=[  # type: ignore[arg-type]
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"},
    ])
    assert follow.status == "completed"


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "store": True}, "store"),
    ({"input": "x", "text": {"format": {"type": "sound"}}}, "text.format.type"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0].type"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": []}, "input"),
])
def test_responses_bad_input_names_the_field(client: TestClient, body: dict, param: str) -> None:  # type: ignore[type-arg]
    r = client.post("/v1/responses", json=body)
    assert r.status_code == 400, r.text
    assert err(r)["param"] == param


# ---- embeddings ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_kinds() -> Iterator[TestClient]:
    models = (ModelConfig(id="default", path="fake://echo", backend="fake", ctx_size=256),  # type: ignore[arg-type]
              ModelConfig(id="embed", path="fake://embed", backend="fake", ctx_size=256, enable_embeddings=True))  # type: ignore[arg-type]
    with TestClient(create_app(Settings(models=models, api_keys=(KEY,))), headers={"Authorization": f"Bearer {KEY}"}) as c:
        ready_wait(c)
        yield c


def test_embeddings_float_and_base64_agree(two_kinds: TestClient) -> None:
    import base64

    import numpy as np

    oai = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=two_kinds, max_retries=0)
    texts = ["the cat sat", "the cat sat", "stock prices fell"]
    r = oai.embeddings.create(model="embed", input=texts, encoding_format="float")
    vectors = [np.array(d.embedding) for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and r.usage.prompt_tokens == 9
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors) and np.allclose(vectors[0], vectors[1])
    raw = two_kinds.post("/v1/embeddings", json={"model": "embed", "input": texts, "encoding_format": "base64"}).json()
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype=np.float32) for d in raw["data"]]
    assert all(np.allclose(a, b) for a, b in zip(vectors, decoded, strict=True))
    models = {m["id"]: m["capabilities"] for m in two_kinds.get("/v1/models").json()["data"]}
    assert models == {"default": ["generation"], "embed": ["embeddings"]}


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "embed", "input": []}, "input"),
    ({"model": "embed", "input": ["a", ""]}, "input"),
    ({"model": "embed", "input": [[1, 2], "x"]}, "input"),
    ({"model": "embed", "input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"model": "embed", "input": "x", "dimensions": 4}, "dimensions"),
    ({"model": "default", "input": "x"}, "model"),
])
def test_embeddings_refuse_bad_input(two_kinds: TestClient, body: dict, param: str) -> None:  # type: ignore[type-arg]
    r = two_kinds.post("/v1/embeddings", json=body)
    assert r.status_code == 400, r.text
    assert err(r)["param"] == param


def test_a_model_loaded_for_embeddings_does_not_chat(two_kinds: TestClient) -> None:
    r = two_kinds.post(CHAT, json={"model": "embed", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and err(r)["param"] == "model" and err(r)["code"] == "wrong_model_kind"


# ---- the audit trail -----------------------------------------------------------------------------------


def test_audit_records_loads_unloads_and_refusals(client: TestClient) -> None:
    assert client.get("/v1/admin/audit", headers={"Authorization": ""}).status_code == 401
    r = client.post("/v1/models", json={"model_id": "audited", "path": "fake://a", "backend": "fake"})
    assert r.status_code == 201, r.text
    assert client.delete("/v1/models/audited").status_code == 200
    assert client.delete("/v1/models/never-loaded").status_code == 404
    client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    events = client.get("/v1/admin/audit", params={"limit": 1000}).json()["data"]
    mine = [(e["action"], e["target"], e["outcome"]) for e in events]
    assert ("model.load", "audited", "ok") in mine and ("model.unload", "audited", "ok") in mine
    assert ("model.unload", "never-loaded", "404 model_not_found") in mine
    assert any(a == "auth.failure" and t == "GET /v1/models" and o == "401" for a, t, o in mine)
    load = next(e for e in events if e["action"] == "model.load")
    assert load["actor"] and load["request_id"] and load["ts"] > 0
    assert all(KEY not in str(e) and "wrong" not in e["actor"] for e in events)  # keys are never kept
    assert client.get("/v1/admin/audit", params={"limit": 0}).status_code == 400
    assert len(client.get("/v1/admin/audit", params={"limit": 1}).json()["data"]) == 1
