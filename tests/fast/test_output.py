"""The shared output layer on its own: detokenizing, stops across tokens, logprob alignment,
finish reasons, tool-call parsing of each format, grammar acceptance. No model: a byte-level
vocabulary (one token per byte, plus a few multi-byte tokens) stands in for one."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import llguidance
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from axserving.errors import APIError, from_engine_failure
from engine_proc.grammar import (
    Constraint,
    GrammarError,
    gbnf_grammar,
    json_schema_grammar,
    lark_grammar,
)
from engine_proc.output import ChoiceOutput
from engine_proc.tokenizer import Tokenizer
from engine_proc.tools import (
    ToolCallStream,
    ToolFormat,
    detect,
    forced_grammar,
    template_messages,
)
from ipc.records import (
    ChatMessage,
    FailCode,
    FinishReason,
    Generation,
    SamplingParams,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolChoice,
)

EOS = 256
WORDS = [b"hello", b" world", b"<tool_call>", b"{\"", b"\": ", b"\xe2\x82", b"\xac"]  # multi-byte tokens


class _Wrapped:
    """What llguidance's TokenizerWrapper reads."""

    def __init__(self, tokens: list[bytes]) -> None:
        self.eos_token_id = EOS
        self.bos_token_id = None
        self.tokens = tokens
        self.special_token_ids = [EOS]

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


class ByteTokenizer(Tokenizer):
    template = "{{ messages }}"

    def __init__(self) -> None:
        self.vocab = [bytes([b]) for b in range(256)] + [b"\xff<eos>"] + WORDS
        self.n_vocab = len(self.vocab)
        self._guidance: llguidance.LLTokenizer | None = None

    def encode(self, text: str, special: bool) -> list[int]:
        return list(text.encode())

    def piece(self, token: int) -> bytes:
        return b"" if token == EOS else self.vocab[token]

    def token_text(self, token: int) -> str:
        return self.vocab[token].decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return token == EOS

    def render(self, messages: list[dict[str, Any]], extra: dict[str, Any]) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages)

    def guidance(self) -> llguidance.LLTokenizer:
        if self._guidance is None:
            self._guidance = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapped(self.vocab)))
        return self._guidance


TOK = ByteTokenizer()


def run(tokens: list[int], stop: tuple[str, ...] = (), max_tokens: int = 1000, gen: Generation | None = None,
        logprobs: bool = True) -> tuple[str, FinishReason | None, list[TokenLogprob], list[ToolCall]]:
    gen = gen or Generation(logprobs=0 if logprobs else -1)
    out = ChoiceOutput(1, 0, SamplingParams(max_tokens=max_tokens, stop=stop), gen, TOK, n_prompt=3)
    text, lps, calls = [], [], []
    finish = None
    for t in tokens:
        lp = TokenLogprob("", -1.0, TOK.piece(t)) if gen.logprobs >= 0 else None
        d = out.accept(t, lp)
        text.append(d.text)
        lps += d.logprobs
        calls += d.tool_calls
        if d.finish_reason is not None:
            finish = d.finish_reason
            break
    return "".join(text), finish, lps, calls


def ids(text: str) -> list[int]:
    return list(text.encode())


# ---- detokenizing, stops, finish reasons ---------------------------------------------------------


def test_eos_finishes_with_stop_and_is_not_text() -> None:
    text, finish, lps, _ = run(ids("hi") + [EOS])
    assert (text, finish) == ("hi", FinishReason.stop)
    assert [lp.token for lp in lps] == ["h", "i"]


def test_max_tokens_finishes_with_length() -> None:
    text, finish, _, _ = run(ids("abcdef"), max_tokens=3)
    assert (text, finish) == ("abc", FinishReason.length)


def test_utf8_split_across_tokens_is_emitted_whole() -> None:
    euro = [256 + 1 + WORDS.index(b"\xe2\x82"), 256 + 1 + WORDS.index(b"\xac")]
    text, _, lps, _ = run(ids("a") + euro + [EOS])
    assert text == "a€"
    assert "".join(lp.token for lp in lps) == text
    assert [lp.raw for lp in lps] == [b"a", b"\xe2\x82", b"\xac"]


def test_stop_string_across_tokens_is_held_back_and_cut() -> None:
    text, finish, lps, _ = run(ids("say STOP now"), stop=("STOP",))
    assert (text, finish) == ("say ", FinishReason.stop)
    assert "".join(lp.token for lp in lps) == "say "


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abc €x", min_size=0, max_size=30),
    stops=st.lists(st.text(alphabet="abcx", min_size=1, max_size=4), max_size=3),
    max_tokens=st.integers(1, 40),
)
def test_logprobs_always_join_to_the_text(text: str, stops: list[str], max_tokens: int) -> None:
    out_text, finish, lps, _ = run(ids(text) + [EOS], stop=tuple(stops), max_tokens=max_tokens)
    assert "".join(lp.token for lp in lps) == out_text
    assert not any(s in out_text for s in stops)
    assert finish in (FinishReason.stop, FinishReason.length)
    # Without a stop match, the output is the input's prefix of max_tokens bytes, decoded.
    if not any(s in text for s in stops):
        assert out_text == text.encode()[:max_tokens].decode("utf-8", "replace")


# ---- tool calls --------------------------------------------------------------------------------


def _feed_all(stream: ToolCallStream, text: str, step: int) -> tuple[str, list[ToolCall]]:
    content, calls = "", []
    for i in range(0, len(text), step):
        c, k = stream.feed(text[i : i + step])
        content += c
        calls += k
    c, k = stream.finish()
    return content + c, calls + k


HERMES = 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' \
         '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


@pytest.mark.parametrize("step", [1, 2, 7, 1000])
def test_hermes_calls_parse_the_same_however_the_text_arrives(step: int) -> None:
    content, calls = _feed_all(ToolCallStream(ToolFormat.hermes), HERMES, step)
    assert content == "Sure."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert all(c.id.startswith("call_") for c in calls) and len({c.id for c in calls}) == 2


def test_a_marker_prefix_is_held_back_and_released_when_it_is_not_one() -> None:
    s = ToolCallStream(ToolFormat.hermes)
    assert s.feed("a <tool") == ("a ", [])
    assert s.feed("box> b") == ("<toolbox> b", [])


def test_not_parallel_keeps_the_first_call_and_stops() -> None:
    s = ToolCallStream(ToolFormat.hermes, parallel=False)
    _, calls = _feed_all(s, HERMES, 5)
    assert [c.name for c in calls] == ["get_weather"]
    assert s.done


def test_an_unparseable_call_is_kept_as_content() -> None:
    content, calls = _feed_all(ToolCallStream(ToolFormat.hermes), "x<tool_call>not json</tool_call>", 3)
    assert calls == [] and content == "x<tool_call>not json</tool_call>"


def test_an_unclosed_call_at_the_end_still_parses() -> None:
    content, calls = _feed_all(ToolCallStream(ToolFormat.hermes), '<tool_call>{"name": "f", "arguments": {"a": 1}}', 4)
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("f", '{"a": 1}')]


def test_mistral_calls() -> None:
    text = '[TOOL_CALLS][{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}]'
    content, calls = _feed_all(ToolCallStream(ToolFormat.mistral), text, 3)
    assert content == "" and [c.name for c in calls] == ["f", "g"]


@pytest.mark.parametrize("text", [
    '{"name": "f", "parameters": {"x": 1}}',
    '<|python_tag|>{"name": "f", "parameters": {"x": 1}}',
    '  {"name": "f", "parameters": {"x": 1}}',
])
def test_llama3_calls(text: str) -> None:
    content, calls = _feed_all(ToolCallStream(ToolFormat.llama3), text, 2)
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("f", '{"x": 1}')]


def test_llama3_plain_text_is_content() -> None:
    content, calls = _feed_all(ToolCallStream(ToolFormat.llama3), "Hello {there}", 2)
    assert (content, calls) == ("Hello {there}", [])


def test_formats_are_detected_from_templates() -> None:
    assert detect(None) is ToolFormat.generic
    assert detect("{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}") is ToolFormat.generic
    assert detect("{% if tools %}<tool_call>{% endif %}") is ToolFormat.hermes
    assert detect("[TOOL_CALLS] {{ tools }}") is ToolFormat.mistral
    assert detect("<|python_tag|>{{ tools }}") is ToolFormat.llama3


def test_generic_rendering_describes_the_tools_and_feeds_calls_back_as_text() -> None:
    tools = [Tool("f", "does f", json.dumps({"type": "object", "properties": {"a": {"type": "string"}}}))]
    msgs = (
        ChatMessage("user", "go"),
        ChatMessage("assistant", "", tool_calls=(ToolCall("call_1", "f", '{"a": "x"}'),)),
        ChatMessage("tool", "42", tool_call_id="call_1"),
    )
    rendered, extra = template_messages(msgs, ToolFormat.generic, tools, lambda t: t)
    assert extra == {}
    assert rendered[0]["role"] == "system" and '"name": "f"' in rendered[0]["content"]
    assert rendered[2]["content"] == '<tool_call>\n{"name": "f", "arguments": {"a": "x"}}\n</tool_call>'
    assert rendered[3] == {"role": "user", "content": "<tool_response>\n42\n</tool_response>"}
    native, extra = template_messages(msgs, ToolFormat.hermes, tools, lambda t: t)
    assert extra["tools"][0]["function"]["name"] == "f"
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"a": "x"}
    assert native[2]["role"] == "tool" and native[2]["tool_call_id"] == "call_1"


def test_tool_calls_through_the_output_layer_set_the_finish_reason() -> None:
    gen = Generation(tools=(Tool("f"),), tool_choice=ToolChoice.auto)
    text, finish, _, calls = run(ids('<tool_call>{"name": "f", "arguments": {}}</tool_call>') + [EOS], gen=gen)
    assert text == "" and finish is FinishReason.tool_calls and [c.name for c in calls] == ["f"]


# ---- grammars ------------------------------------------------------------------------------------


def _walk(constraint: Constraint, text: str) -> bool:
    """Feed ``text`` byte by byte; True if the grammar allowed every byte."""
    for t in ids(text):
        if not constraint.allowed()[t] or not constraint.consume(t):
            return False
    return True


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "kind": {"enum": ["cat", "dog"]},
        "tags": {"type": "array", "items": {"type": "integer"}},
        "owner": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]},
    },
    "required": ["name", "kind", "tags", "owner"],
    "additionalProperties": False,
}


def test_a_schema_grammar_accepts_valid_json_and_masks_the_rest() -> None:
    grammar = json_schema_grammar(SCHEMA)
    good = '{"name": "Rex", "kind": "dog", "tags": [1, 2], "owner": {"id": 7}}'
    jsonschema.validate(json.loads(good), SCHEMA)
    c = Constraint(TOK.guidance(), grammar, TOK.n_vocab)
    assert _walk(c, good)
    assert c.allowed()[EOS] and c.accepting()
    bad = Constraint(TOK.guidance(), grammar, TOK.n_vocab)
    assert not _walk(bad, '{"name": "Rex", "kind": "cow"')


def test_a_constrained_random_walk_always_validates() -> None:
    """Draw tokens at random among those the mask allows: every finished output validates."""
    import random

    rng = random.Random(1)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 99}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    grammar = json_schema_grammar(schema)
    for _ in range(20):
        c = Constraint(TOK.guidance(), grammar, TOK.n_vocab)
        out = b""
        for _ in range(200):
            allowed = [t for t, ok in enumerate(c.allowed()) if ok]
            t = rng.choice(allowed)
            assert c.consume(t)
            out += TOK.piece(t)
            if t == EOS or c.done():
                break
        jsonschema.validate(json.loads(out), schema)


def test_gbnf_and_errors_name_the_problem() -> None:
    c = Constraint(TOK.guidance(), gbnf_grammar('root ::= "yes" | "no"'), TOK.n_vocab)
    assert _walk(c, "no") and c.accepting()
    with pytest.raises(GrammarError, match="nope"):
        gbnf_grammar("root ::= nope")
    with pytest.raises(GrammarError):
        json_schema_grammar({"type": "object", "properties": {"a": {"type": "strin"}}})
    with pytest.raises(GrammarError):
        json_schema_grammar({"type": "string", "format": "no-such-format"}, strict=True)


@pytest.mark.parametrize("fmt", list(ToolFormat))
@pytest.mark.parametrize("parallel", [True, False])
def test_forced_tool_grammars_compile_and_force_a_call(fmt: ToolFormat, parallel: bool) -> None:
    tools = [Tool("f", parameters=json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})),
             Tool("g")]
    grammar = lark_grammar(forced_grammar(fmt, tools, "f", parallel))
    c = Constraint(TOK.guidance(), grammar, TOK.n_vocab)
    key = "parameters" if fmt is ToolFormat.llama3 else "arguments"
    body = json.dumps({"name": "f", key: {"a": 1}})
    text = {ToolFormat.mistral: f"[{body}]"}.get(fmt, body if fmt is ToolFormat.llama3 else f"<tool_call>\n{body}\n</tool_call>")
    assert _walk(c, text) and c.accepting()
    wrong = Constraint(TOK.guidance(), grammar, TOK.n_vocab)
    assert not _walk(wrong, text.replace('"f"', '"g"'))


# ---- the records' enums map to HTTP, totally ------------------------------------------------------


@pytest.mark.parametrize("code", list(FailCode))
def test_every_engine_failure_code_maps_to_an_api_error(code: FailCode) -> None:
    err = from_engine_failure(code, "m", "p")
    assert isinstance(err, APIError) and err.param == "p" and err.code == code.value
    assert 400 <= err.status < 600


def test_finish_reasons_are_openais() -> None:
    assert {f.value for f in FinishReason} == {"stop", "length", "tool_calls"}
