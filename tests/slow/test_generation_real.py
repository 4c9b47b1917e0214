"""Slow tier: the OpenAI generation surface on a real `axserving run` (SmolLM2, llama.cpp), driven
by the official openai client: structured output, tools, n, logprobs, logit_bias, seeds, and the
request fields around them. Content is tested loosely (a 135M model), structure exactly."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.server import BACKENDS, Server, openai_client, run_smollm, smollm_on

pytestmark = pytest.mark.slow

ASK = [{"role": "user", "content": "Describe a pet dog named Rex who is 3 years old."}]
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}]
TIME = [{"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                          "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 20}},
                                                         "required": ["tz"]}}}]


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    backend, model = smollm_on(request)
    with run_smollm(tmp_path_factory.mktemp("gen"), model, backend) as s:
        yield s


@pytest.fixture(scope="module")
def oai(server: Server) -> openai.OpenAI:
    return openai_client(server)


# ---- structured output -------------------------------------------------------------------------

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {
        "pet": {"type": "object", "properties": {"kind": {"enum": ["dog", "cat", "bird"]},
                                                 "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
                "required": ["kind", "legs"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3}},
     "required": ["pet", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "score": {"type": "number"},
                                      "level": {"enum": ["low", "mid", "high"]}},
     "required": ["ok", "level"], "additionalProperties": False},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["flat", "nested-array-enum", "bool-enum"])
def test_json_schema_output_validates(oai: openai.OpenAI, schema: dict[str, Any]) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
    for temperature in (0.0, 1.0):
        r = oai.chat.completions.create(model="default", messages=ASK, temperature=temperature, seed=3,
                                        max_tokens=200, response_format=fmt)  # type: ignore[arg-type]
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content or ""), schema)
    streamed = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(
        model="default", messages=ASK, temperature=0, max_tokens=200, response_format=fmt, stream=True)  # type: ignore[arg-type]
        if c.choices)
    jsonschema.validate(json.loads(streamed), schema)


def test_json_object_and_gbnf(oai: openai.OpenAI) -> None:
    as_json = [{"role": "user", "content": "Reply with a JSON object with the keys name and age for Rex, 3."}]
    r = oai.chat.completions.create(model="default", messages=as_json, temperature=0, max_tokens=200,
                                    response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
    g = oai.chat.completions.create(model="default", messages=[{"role": "user", "content": "Is the sky blue?"}],
                                    temperature=0, max_tokens=10, extra_body={"grammar": 'root ::= "yes" | "no"'})
    assert g.choices[0].message.content in ("yes", "no") and g.choices[0].finish_reason == "stop"
    c = oai.completions.create(model="default", prompt="Count: one, two,", temperature=0, max_tokens=10,
                               extra_body={"grammar": 'root ::= " three" ("," " four")?'})
    assert c.choices[0].text in (" three", " three, four")


# ---- tools -------------------------------------------------------------------------------------

PARIS = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def _reassemble(stream: Any) -> tuple[list[dict[str, str]], str | None, str]:
    calls: dict[int, dict[str, str]] = {}
    finish, content = None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            p = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            p["id"] += tc.id or ""
            if tc.function:
                p["name"] += tc.function.name or ""
                p["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish, content


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_a_forced_tool_call_parses_and_streams_the_same(oai: openai.OpenAI, choice: Any) -> None:
    kw: dict[str, Any] = {"model": "default", "messages": PARIS, "temperature": 0, "max_tokens": 80,
                          "tools": WEATHER + TIME, "tool_choice": choice}
    r = oai.chat.completions.create(**kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
    args = json.loads(call.function.arguments)  # type: ignore[union-attr]
    schema = next(t for t in WEATHER + TIME if t["function"]["name"] == call.function.name)["function"]["parameters"]  # type: ignore[union-attr]
    jsonschema.validate(args, schema)
    calls, finish, content = _reassemble(oai.chat.completions.create(stream=True, **kw))
    assert finish == "tool_calls" and content == ""
    assert [(x["name"], x["arguments"]) for x in calls] == [(call.function.name, call.function.arguments)]  # type: ignore[union-attr]


def test_parallel_forced_calls_when_asked(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model="default", temperature=0, max_tokens=60, tools=WEATHER,
                                    messages=PARIS, tool_choice="required", parallel_tool_calls=False)
    assert len(r.choices[0].message.tool_calls or []) == 1


def test_a_tool_result_fed_back_produces_an_answer(oai: openai.OpenAI) -> None:
    first = oai.chat.completions.create(model="default", messages=PARIS, temperature=0, max_tokens=80,
                                        tools=WEATHER, tool_choice="required")
    call = (first.choices[0].message.tool_calls or [])[0]
    messages: list[Any] = [*PARIS, first.choices[0].message.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'}]
    r = oai.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=60,
                                    tools=WEATHER, tool_choice="none")
    answer = r.choices[0].message.content or ""
    assert answer.strip() and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason in ("stop", "length")


def test_auto_tools_answer_or_call_well_formed(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model="default", messages=PARIS, temperature=0, max_tokens=80, tools=WEATHER)
    c = r.choices[0]
    if c.message.tool_calls:
        assert c.finish_reason == "tool_calls"
        json.loads(c.message.tool_calls[0].function.arguments)  # type: ignore[union-attr]
    else:
        assert "<tool_call>" not in (c.message.content or "")


# ---- n, logprobs, logit_bias, seeds --------------------------------------------------------------


def test_n_choices_share_one_prefill(oai: openai.OpenAI, server: Server) -> None:
    before = _prefilled(server)
    msgs = [{"role": "user", "content": "Name a colour. " + "Think of the rainbow and its seven colours. " * 8}]
    r = oai.chat.completions.create(model="default", messages=msgs, n=3, temperature=1.0, seed=11, max_tokens=16,
                                    logprobs=True)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content for c in r.choices)
    assert len({c.message.content for c in r.choices}) > 1  # each choice draws its own stream
    assert r.usage is not None
    # usage counts every choice's tokens (an end-of-turn token counts, and is not text)
    assert r.usage.completion_tokens == sum(
        len(c.logprobs.content or []) + (c.finish_reason == "stop") for c in r.choices if c.logprobs)
    computed = _prefilled(server) - before
    assert computed <= r.usage.prompt_tokens, (computed, r.usage)  # once, not three times
    texts: dict[int, str] = {}
    for chunk in oai.chat.completions.create(model="default", messages=msgs, n=3, temperature=1.0, seed=11,
                                             max_tokens=16, stream=True):
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
    assert texts == {c.index: c.message.content for c in r.choices}  # the same seeds, the same choices


def _prefilled(server: Server) -> int:
    """The engine's prompt tokens computed, once its counters have settled: they come in stats
    records about once a second, so a read right after a request may not count it yet."""
    def read() -> int:
        return int(server.status()["models"][0]["engine"]["prefill_tokens"])

    last, deadline = read(), time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(1.2)  # longer than the engine's stats interval
        now = read()
        if now == last:
            return now
        last = now
    return last


def test_greedy_top_logprob_is_the_chosen_token(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model="default", messages=ASK, temperature=0, max_tokens=24,
                                    logprobs=True, top_logprobs=5)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content
    assert "".join(t.token for t in lp.content) == r.choices[0].message.content
    for t in lp.content:
        assert len(t.top_logprobs) == 5 and t.logprob <= 0
        assert t.top_logprobs[0].token == t.token or t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
    streamed = [t.token for c in oai.chat.completions.create(model="default", messages=ASK, temperature=0,
                                                             max_tokens=24, logprobs=True, stream=True)
                if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content
                for t in c.choices[0].logprobs.content]
    assert streamed == [t.token for t in lp.content]
    legacy = oai.completions.create(model="default", prompt="The capital of France is", temperature=0,
                                    max_tokens=6, logprobs=3)
    ll = legacy.choices[0].logprobs
    assert ll is not None and "".join(ll.tokens or []) == legacy.choices[0].text
    assert all(len(t) == 3 for t in ll.top_logprobs or [])


def test_logit_bias_bans_a_token(oai: openai.OpenAI, default_model: Path) -> None:
    plain = oai.chat.completions.create(model="default", messages=ASK, temperature=0, max_tokens=12,
                                        logprobs=True)
    first = plain.choices[0].logprobs.content[0]  # type: ignore[union-attr,index]
    banned = _token_id(default_model, first.token)
    r = oai.chat.completions.create(model="default", messages=ASK, temperature=0, max_tokens=12, logprobs=True,
                                    logit_bias={str(banned): -100})
    assert r.choices[0].logprobs.content[0].token != first.token  # type: ignore[union-attr,index]


def _token_id(model: Path, token: str) -> int:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=32, verbose=False, vocab_only=True)
    ids = llm.tokenize(token.encode(), add_bos=False, special=False)
    assert len(ids) == 1, ids
    return int(ids[0])


def test_a_seed_reproduces_a_sampled_reply_whatever_runs_beside_it(oai: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": "default", "messages": ASK, "temperature": 1.0, "top_p": 0.95,
                          "seed": 1234, "max_tokens": 32}
    alone = oai.chat.completions.create(**kw).choices[0].message.content
    busy = threading.Event()

    def neighbour() -> None:
        while not busy.is_set():
            oai.chat.completions.create(model="default", messages=[{"role": "user", "content": "Tell me a story."}],
                                        temperature=0.8, max_tokens=24)

    threads = [threading.Thread(target=neighbour) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        beside = [oai.chat.completions.create(**kw).choices[0].message.content for _ in range(2)]
    finally:
        busy.set()
        for t in threads:
            t.join()
    assert beside == [alone, alone]
    other = oai.chat.completions.create(**{**kw, "seed": 99}).choices[0].message.content
    assert other != alone


# ---- request fields around them -------------------------------------------------------------------


def test_fields_honoured_together(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(
        messages=[{"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
                  {"role": "developer", "content": "Answer in English."},
                  {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Count from one to ten."}]}],
        model="default", temperature=0.3, top_p=0.9, max_completion_tokens=20, stop=["five", "\n\n"],
        presence_penalty=0.5, frequency_penalty=0.5, seed=1, user="u-1",
        stream_options=None, extra_body={"top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1},
    )
    assert "five" not in (r.choices[0].message.content or "")
    assert r.usage is not None and r.usage.completion_tokens <= 20
    chunks = list(oai.chat.completions.create(model="default", messages=ASK, max_tokens=5, stream=True,
                                              stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5 and not chunks[-1].choices


def test_max_tokens_is_bounded_by_the_context(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="default", messages=ASK, max_tokens=4096)
    assert e.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="default", prompt="word " * 3000, max_tokens=4)
    assert e.value.body["param"] == "prompt"  # type: ignore[index]


# ---- Anthropic's Messages API on the real model ---------------------------------------------------


@pytest.fixture(scope="module")
def claude(server: Server) -> Any:
    import anthropic

    return anthropic.Anthropic(base_url=server.v1.removesuffix("/v1"), api_key=server.api_key, max_retries=0, timeout=120)


def test_messages_reply_stream_tool_round_trip_and_count(claude: Any) -> None:
    question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    msg = claude.messages.create(model="default", max_tokens=40, extra_body={"temperature": 0}, messages=question)
    assert "paris" in msg.content[0].text.lower() and msg.stop_reason in ("end_turn", "max_tokens")
    with claude.messages.stream(model="default", max_tokens=40, extra_body={"temperature": 0}, messages=question) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == msg.content[0].text and final.usage.output_tokens == msg.usage.output_tokens
    tools = [{"name": "get_weather", "description": "Get the current weather in a city",
              "input_schema": WEATHER[0]["function"]["parameters"]}]
    forced = claude.messages.create(model="default", max_tokens=80, extra_body={"temperature": 0}, tools=tools,
                                    tool_choice={"type": "tool", "name": "get_weather"}, messages=PARIS)
    assert forced.stop_reason == "tool_use"
    use = next(b for b in forced.content if b.type == "tool_use")
    jsonschema.validate(use.input, tools[0]["input_schema"])
    answer = claude.messages.create(model="default", max_tokens=40, extra_body={"temperature": 0}, tools=tools, messages=[
        *PARIS,
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 C and sunny"}]},
    ])
    assert answer.content and answer.content[0].type == "text" and answer.content[0].text.strip()
    count = claude.messages.count_tokens(model="default", messages=question)
    assert count.input_tokens == msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0)


# ---- the Responses API on the real model ----------------------------------------------------------


def test_responses_stream_matches_json_schema_and_function_call(oai: openai.OpenAI) -> None:
    question = "What is the capital of France? Answer in one word."
    r = oai.responses.create(model="default", input=question, temperature=0, max_output_tokens=40)
    assert "paris" in r.output_text.lower()
    events = list(oai.responses.create(model="default", input=question, temperature=0, max_output_tokens=40, stream=True))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    fmt = {"format": {"type": "json_schema", "name": "pet", "schema": SCHEMAS[1], "strict": True}}
    j = oai.responses.create(model="default", input=ASK, temperature=0, max_output_tokens=200, text=fmt)  # type: ignore[arg-type]
    jsonschema.validate(json.loads(j.output_text), SCHEMAS[1])
    tools = [{"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
              "parameters": WEATHER[0]["function"]["parameters"]}]
    call_r = oai.responses.create(model="default", input=PARIS, temperature=0, max_output_tokens=80, tools=tools,  # type: ignore[arg-type]
                                  tool_choice="required")
    call = next(o for o in call_r.output if o.type == "function_call")
    jsonschema.validate(json.loads(call.arguments), tools[0]["parameters"])
    answer = oai.responses.create(model="default", temperature=0, max_output_tokens=40, tools=tools, input=[  # type: ignore[arg-type]
        *PARIS,
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "21 C and sunny"},
    ], tool_choice="none")
    assert answer.output_text.strip()


# ---- embeddings on the real model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def embed_model(server: Server, oai: openai.OpenAI, default_model: Path) -> str:
    import httpx

    r = httpx.post(f"{server.v1}/models", headers={"Authorization": f"Bearer {server.api_key}"}, timeout=120,
                   json={"model_id": "smol-embed", "path": str(default_model), "backend": "llama_cpp", "enable_embeddings": True, "context_length": 512,
                         "max_batch": 64})
    assert r.status_code in (200, 201), r.text
    return "smol-embed"


def test_embeddings_on_the_real_model(oai: openai.OpenAI, embed_model: str) -> None:
    import base64

    import numpy as np

    texts = ["The cat sat on the mat.", "A cat was sitting on a rug.", "Quarterly revenue grew by five percent."]
    r = oai.embeddings.create(model=embed_model, input=texts)
    v = [np.array(d.embedding) for d in r.data]
    assert all(abs(np.linalg.norm(x) - 1) < 1e-4 for x in v) and len(v[0]) == 576
    assert float(v[0] @ v[1]) > float(v[0] @ v[2])  # similar sentences are closer than unrelated ones
    b = oai.embeddings.create(model=embed_model, input=texts, encoding_format="base64")
    raw = [np.frombuffer(base64.b64decode(d.embedding), dtype=np.float32) for d in b.data]  # type: ignore[arg-type]
    assert all(np.allclose(x, y, atol=1e-6) for x, y in zip(v, raw, strict=True))
    many = oai.embeddings.create(model=embed_model, input=[f"sentence number {i} about topic {i % 7}" for i in range(64)])
    assert [d.index for d in many.data] == list(range(64)) and many.usage.prompt_tokens > 64 * 4
    ids = oai.embeddings.create(model=embed_model, input=[[1, 2, 3, 4]])
    assert len(ids.data[0].embedding) == 576
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=embed_model, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["param"] == "model"  # type: ignore[index]
