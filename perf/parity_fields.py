"""Which OpenAI request fields each server honours: the same client code against axserving and
llama-cpp-python's own server (``python -m llama_cpp.server``), on the same model.

Each check sends one request (or a few) with the official ``openai`` client and says whether the
field did what OpenAI documents: ``yes``, ``no`` (accepted and ignored, or wrong), or the error it
answered with. Bad-input checks pass when the server answers a 4xx naming the problem.

    .venv/bin/python perf/parity_fields.py [--ours URL --peer URL]   # else it starts both
Needs the perf extra (``pip install -e '.[perf]'``) to start the peer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jsonschema
import openai

ASK = [{"role": "user", "content": "Describe a dog named Rex, 3 years old, as JSON."}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
                                           "kind": {"enum": ["dog", "cat"]}},
          "required": ["name", "age", "kind"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                                                          "required": ["city"]}}}]
PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]


def _chat(c: openai.OpenAI, **kw: Any) -> Any:
    kw.setdefault("model", "default")
    kw.setdefault("messages", ASK)
    kw.setdefault("max_tokens", 60)
    kw.setdefault("temperature", 0)
    return c.chat.completions.create(**kw)


def _raw(c: openai.OpenAI, body: bytes) -> int:
    r = httpx.post(f"{c.base_url}chat/completions", content=body, timeout=60,
                   headers={"Authorization": f"Bearer {c.api_key}", "Content-Type": "application/json"})
    return r.status_code


def check_model_omitted(c: openai.OpenAI) -> bool:
    r = httpx.post(f"{c.base_url}chat/completions", json={"messages": ASK, "max_tokens": 4}, timeout=60,
                   headers={"Authorization": f"Bearer {c.api_key}"})
    return r.status_code == 200


def check_n(c: openai.OpenAI) -> bool:
    return len(_chat(c, n=2, temperature=0.9, max_tokens=8).choices) == 2


def check_logprobs(c: openai.OpenAI) -> bool:
    r = _chat(c, logprobs=True, top_logprobs=2, max_tokens=8)
    lp = r.choices[0].logprobs
    return bool(lp and lp.content and all(len(t.top_logprobs) == 2 for t in lp.content)
                and "".join(t.token for t in lp.content) == r.choices[0].message.content)


def check_legacy_logprobs(c: openai.OpenAI) -> bool:
    r = c.completions.create(model="default", prompt="The sky is", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    return bool(lp and lp.tokens and lp.top_logprobs and len(lp.top_logprobs[0]) == 2)


def check_json_object(c: openai.OpenAI) -> bool:
    # (A 135M model asked to "describe" something as JSON nests objects until max_tokens: the
    # output is then cut, as OpenAI documents for finish_reason "length". Ask for something short.)
    ask = [{"role": "user", "content": "Reply with a JSON object with the keys name and age for Rex, 3."}]
    r = _chat(c, messages=ask, response_format={"type": "json_object"}, max_tokens=150)
    try:
        return isinstance(json.loads(r.choices[0].message.content or ""), dict)
    except ValueError:
        return False


def check_json_schema(c: openai.OpenAI) -> bool:
    r = _chat(c, max_tokens=150, response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": SCHEMA, "strict": True}})
    try:
        jsonschema.validate(json.loads(r.choices[0].message.content or ""), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def check_unknown_response_format_is_400(c: openai.OpenAI) -> bool:
    try:
        _chat(c, response_format={"type": "sound"}, max_tokens=4)
    except openai.BadRequestError:
        return True
    return False


def check_forced_tool_call(c: openai.OpenAI) -> bool:
    r = _chat(c, messages=PARIS, tools=TOOLS, tool_choice="required", max_tokens=60)
    calls = r.choices[0].message.tool_calls or []
    return bool(calls) and r.choices[0].finish_reason == "tool_calls" and "city" in json.loads(calls[0].function.arguments)


def check_named_tool_call_streamed(c: openai.OpenAI) -> bool:
    kw = {"messages": PARIS, "tools": TOOLS, "max_tokens": 60,
          "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    full = _chat(c, **kw).choices[0].message.tool_calls or []
    name, args = "", ""
    for chunk in _chat(c, stream=True, **kw):
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            name += (tc.function.name or "") if tc.function else ""
            args += (tc.function.arguments or "") if tc.function else ""
    return bool(full) and (name, json.loads(args or "null")) == (full[0].function.name, json.loads(full[0].function.arguments))


def check_stop_list(c: openai.OpenAI) -> bool:
    r = _chat(c, messages=[{"role": "user", "content": "Count from 1 to 10, comma separated."}], stop=["5", "five"])
    return "5" not in (r.choices[0].message.content or "")


def check_seed(c: openai.OpenAI) -> bool:
    kw = {"temperature": 1.0, "seed": 42, "max_tokens": 24}
    return bool(_chat(c, **kw).choices[0].message.content == _chat(c, **kw).choices[0].message.content)


def check_logit_bias(c: openai.OpenAI) -> bool:
    # Ban the greedy reply's first token, found through the completions logprobs' top token id:
    # both servers take token ids; we read them from axserving-compatible logprobs bytes.
    first = _chat(c, max_tokens=1, logprobs=True).choices[0]
    token = first.logprobs.content[0].token if first.logprobs and first.logprobs.content else None
    if token is None:
        return False
    ids = _token_ids(token)
    if len(ids) != 1:
        return False
    banned = _chat(c, max_tokens=1, logprobs=True, logit_bias={str(ids[0]): -100}).choices[0]
    return bool(banned.logprobs and banned.logprobs.content and banned.logprobs.content[0].token != token)


def _token_ids(text: str) -> list[int]:
    import llama_cpp

    path = subprocess.run([sys.executable, "-m", "axserving.cli", "models", "path"], capture_output=True, text=True,
                          check=True).stdout.strip()
    llm = llama_cpp.Llama(model_path=path, n_ctx=32, verbose=False, vocab_only=True)
    return list(llm.tokenize(text.encode(), add_bos=False, special=False))


def check_max_completion_tokens(c: openai.OpenAI) -> bool:
    r = _chat(c, max_tokens=None, max_completion_tokens=5, extra_body={"ignore_eos": True})
    return r.usage is not None and r.usage.completion_tokens <= 5


def check_include_usage(c: openai.OpenAI) -> bool:
    chunks = list(_chat(c, stream=True, max_tokens=4, stream_options={"include_usage": True}))
    return chunks[-1].usage is not None and not chunks[-1].choices


def check_echo(c: openai.OpenAI) -> bool:
    r = c.completions.create(model="default", prompt="Hello there", max_tokens=3, echo=True, temperature=0)
    return r.choices[0].text.startswith("Hello there")


def check_gbnf_grammar(c: openai.OpenAI) -> bool:
    r = _chat(c, messages=[{"role": "user", "content": "Is fire hot?"}], extra_body={"grammar": 'root ::= "yes" | "no"'})
    return r.choices[0].message.content in ("yes", "no")


def check_image_part_is_400(c: openai.OpenAI) -> bool:
    try:
        _chat(c, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}], max_tokens=2)
    except openai.BadRequestError:
        return True
    return False


def check_top_logprobs_over_20_is_4xx(c: openai.OpenAI) -> bool:
    try:
        _chat(c, logprobs=True, top_logprobs=21, max_tokens=2)
    except openai.APIStatusError as e:
        return 400 <= e.status_code < 500
    return False


def check_huge_seed_is_4xx(c: openai.OpenAI) -> bool:
    return 400 <= _raw(c, b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "seed": 18446744073709551617}') < 500


def check_deep_json_is_4xx(c: openai.OpenAI) -> bool:
    return 400 <= _raw(c, b'{"messages": ' + b"[" * 50000 + b"]" * 50000 + b"}") < 500


def check_parallel_tool_calls_false(c: openai.OpenAI) -> bool:
    r = _chat(c, messages=PARIS, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=80)
    return len(r.choices[0].message.tool_calls or []) == 1


CHECKS: list[tuple[str, Callable[[openai.OpenAI], bool]]] = [
    (name.removeprefix("check_"), fn) for name, fn in globals().items() if name.startswith("check_")
]


def run_checks(c: openai.OpenAI) -> dict[str, str]:
    out = {}
    for name, fn in CHECKS:
        try:
            out[name] = "yes" if fn(c) else "no"
        except openai.APIStatusError as e:
            out[name] = f"HTTP {e.status_code}"
        except Exception as e:  # a client-side parse failure is a finding too
            out[name] = f"{type(e).__name__}"
    return out


@contextlib.contextmanager
def _server(cmd: list[str], url: str, log: str, env: dict[str, str] | None = None) -> Iterator[None]:
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        for _ in range(480):
            try:
                if httpx.get(f"{url}/v1/models", timeout=2, headers={"Authorization": "Bearer sk-parity"}).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"{cmd[2]} did not start; see {log}")
        yield
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours")
    ap.add_argument("--peer")
    ap.add_argument("--threads", default="2")
    args = ap.parse_args()
    results: dict[str, dict[str, str]] = {}
    with contextlib.ExitStack() as stack:
        ours, peer = args.ours, args.peer
        if ours is None:
            ours = "http://127.0.0.1:18190"
            stack.enter_context(_server(
                [sys.executable, "-m", "axserving.cli", "run", "--threads", args.threads, "--host", "127.0.0.1",
                 "--port", "18190"], ours, "/tmp/parity_ours.log", {"AXS_API_KEY": "sk-parity"}))
        if peer is None:
            peer = "http://127.0.0.1:18191"
            model = subprocess.run([sys.executable, "-m", "axserving.cli", "models", "path"], capture_output=True,
                                   text=True, check=True).stdout.strip()
            stack.enter_context(_server(
                [sys.executable, "-m", "llama_cpp.server", "--model", model, "--model_alias", "default",
                 "--n_threads", args.threads, "--n_ctx", "4096", "--host", "127.0.0.1", "--port", "18191"],
                peer, "/tmp/parity_peer.log"))
        for label, url in (("axserving", ours), ("llama_cpp.server", peer)):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-parity", max_retries=0, timeout=120)
            results[label] = run_checks(client)
    width = max(len(n) for n, _ in CHECKS)
    print(f"{'field / behaviour':<{width}}  {'axserving':<12}  llama_cpp.server")
    for name, _ in CHECKS:
        print(f"{name:<{width}}  {results['axserving'][name]:<12}  {results['llama_cpp.server'][name]}")
    for label, res in results.items():
        print(f"{label}: {sum(v == 'yes' for v in res.values())}/{len(res)} honoured")


if __name__ == "__main__":
    main()
