"""Tool calling for every model: prompt rendering, forced-call grammars, and output parsing.

A model's chat template says how it was taught to call tools. :func:`detect` reads the common
native formats from the template text:

- ``hermes``: ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` (Hermes, Qwen 2.5/3,
  SmolLM3): tools go into the template's ``tools`` variable;
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": ...}, ...]``;
- ``llama3``: a bare ``{"name": ..., "parameters": ...}`` object, optionally after
  ``<|python_tag|>``;
- ``generic``: templates that know nothing of tools (SmolLM2, most small models). The tools and
  the Hermes wire format are described in a system message, and the output is parsed as Hermes.
  (llama.cpp's generic tool-call mode does the same with its own JSON envelope.)

``tool_choice`` ``required`` or a named function is not left to the model: :func:`forced_grammar`
constrains decoding so the output is exactly well-formed calls to the allowed tools, with
arguments that validate against their schemas. :class:`ToolCallStream` splits generated text into
content and complete calls as it arrives, holding back a possible marker the way stop strings are
held back, so no half of ``<tool_call>`` ever reaches the client as content.
"""

from __future__ import annotations

import enum
import json
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from engine_proc.backends.detok import StopStringMatcher
from engine_proc.grammar import JSON_OPTIONS, lark_json
from ipc.records import ChatMessage, Tool, ToolCall


class ToolFormat(enum.StrEnum):
    hermes = "hermes"
    mistral = "mistral"
    llama3 = "llama3"
    generic = "generic"


# Texts that some vocabularies hold as control tokens; they must reach the parser as text.
MARKER_TEXTS = ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>")


def detect(template: str | None) -> ToolFormat:
    """The tool-call format a chat template was written for."""
    if not template:
        return ToolFormat.generic
    if "<tool_call>" in template and "tools" in template:
        return ToolFormat.hermes
    if "[TOOL_CALLS]" in template:
        return ToolFormat.mistral
    if "<|python_tag|>" in template or ("ipython" in template and "tools" in template):
        return ToolFormat.llama3
    return ToolFormat.generic


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _schema(tool: Tool) -> dict[str, Any]:
    params = json.loads(tool.parameters) if tool.parameters else {}
    return params if isinstance(params, dict) and params else {"type": "object"}


def openai_tools(tools: Sequence[Tool]) -> list[dict[str, Any]]:
    """The tools as OpenAI's request lists them (what chat templates expect)."""
    return [
        {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": _schema(t)}}
        for t in tools
    ]


def _hermes_call(call: ToolCall) -> str:
    return json.dumps({"name": call.name, "arguments": _arguments(call)}, ensure_ascii=False)


def _arguments(call: ToolCall) -> Any:
    try:
        return json.loads(call.arguments) if call.arguments else {}
    except ValueError:
        return call.arguments


GENERIC_SYSTEM = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def template_messages(
    messages: Sequence[ChatMessage],
    fmt: ToolFormat,
    tools: Sequence[Tool],
    content: Callable[[str], str],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages as the chat template takes them, and the template's extra variables.

    ``content`` maps a piece of message text to what the template is given for it (the backend
    passes placeholders, so that message text is tokenized as text). Earlier tool calls and tool
    results are fed back in the model's own format; for ``generic`` templates they become text
    (calls in Hermes tags, results in ``<tool_response>`` in a user turn), since such templates
    may not know the ``tool`` role.
    """
    out: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    if tools and fmt is not ToolFormat.generic:
        extra["tools"] = openai_tools(tools)
    elif tools:
        listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in openai_tools(tools))
        system = GENERIC_SYSTEM.format(tools=listed)
        if messages and messages[0].role in ("system", "developer"):
            system = messages[0].content + "\n\n" + system
            messages = messages[1:]
        out.append({"role": "system", "content": content(system)})
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        if fmt is ToolFormat.generic and role == "tool":
            out.append({"role": "user", "content": content(f"<tool_response>\n{m.content}\n</tool_response>")})
            continue
        text = m.content
        if fmt is ToolFormat.generic and m.tool_calls:
            calls = "\n".join(f"<tool_call>\n{_hermes_call(c)}\n</tool_call>" for c in m.tool_calls)
            text = f"{text}\n{calls}" if text else calls
        msg: dict[str, Any] = {"role": role, "content": content(text)}
        if m.name:
            msg["name"] = m.name
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        if m.tool_calls and fmt is not ToolFormat.generic:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments(c)}}
                for c in m.tool_calls
            ]
        out.append(msg)
    return out, extra


def forced_grammar(fmt: ToolFormat, tools: Sequence[Tool], name: str | None, parallel: bool) -> str:
    """A Lark grammar whose every sentence is well-formed calls to ``tools`` (only ``name`` if
    given), one, or with ``parallel`` one or more."""
    chosen = [t for t in tools if name is None or t.name == name]
    args_key = "parameters" if fmt is ToolFormat.llama3 else "arguments"
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, args_key: _schema(t)},
            "required": ["name", args_key],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    one: dict[str, Any] = variants[0] if len(variants) == 1 else {"anyOf": variants}
    one = {**one, "x-guidance": JSON_OPTIONS}
    if fmt is ToolFormat.mistral:
        array: dict[str, Any] = {"type": "array", "items": one, "minItems": 1}
        if not parallel:
            array["maxItems"] = 1
        return f"start: {lark_json(array)}\n"
    if fmt is ToolFormat.llama3:
        more = ' (";" call)*' if parallel else ""
        return f"start: call{more}\ncall: {lark_json(one)}\n"
    more = ' ("\\n" call)*' if parallel else ""
    return f'start: call{more}\ncall: "<tool_call>\\n" {lark_json(one)} "\\n</tool_call>"\n'


def _parse_call(obj: Any, args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), obj["name"], json.dumps(args, ensure_ascii=False))


def _parse_calls(body: str, args_key: str) -> list[ToolCall] | None:
    """Calls in ``body``: one JSON object, an array of them, or objects separated by ';' or
    newlines. None if it is not that."""
    body = body.strip()
    if not body:
        return None
    try:
        parsed = json.loads(body)
        objs = parsed if isinstance(parsed, list) else [parsed]
    except ValueError:
        objs = []
        for part in body.replace(";", "\n").splitlines():
            if part.strip():
                try:
                    objs.append(json.loads(part))
                except ValueError:
                    return None
    calls = [_parse_call(o, args_key) for o in objs]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


class ToolCallStream:
    """Splits a generated text, fed piece by piece, into content and complete tool calls."""

    def __init__(self, fmt: ToolFormat, forced: bool = False, parallel: bool = True) -> None:
        self.fmt = fmt
        self.parallel = parallel
        if fmt is ToolFormat.mistral:
            self._open, self._close = "[TOOL_CALLS]", None
        elif fmt is ToolFormat.llama3:
            self._open, self._close = "<|python_tag|>", None
        else:
            self._open, self._close = "<tool_call>", "</tool_call>"
        self._args_key = "parameters" if fmt is ToolFormat.llama3 else "arguments"
        self._matcher = StopStringMatcher([self._open])
        self._held = ""  # text not yet decided
        self.forced = forced
        self._in_calls = forced and self._close is None  # forced mistral/llama3: all of it is calls
        self._seen_content = False
        self.calls: list[ToolCall] = []
        self.done = False  # no more calls can come (parallel_tool_calls false and one came)

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """Add generated text; return the content that is certain now and the calls completed."""
        if self.done:
            return "", []
        held = self._held + text
        content, calls = "", list[ToolCall]()
        while held:
            if self.calls or calls:
                held = held.lstrip()  # whitespace between calls is not content
                if not held:
                    break
            if not self._in_calls:
                # A bare JSON object at the very start may be a Llama 3 call: hold it to the end.
                if self.fmt is ToolFormat.llama3 and not self._seen_content and held.lstrip().startswith("{"):
                    self._in_calls = True
                    continue
                at = held.find(self._open)
                if at == -1:
                    keep = self._matcher.holdback(held)
                    if self.fmt is ToolFormat.llama3 and not self._seen_content and not held.strip():
                        keep = len(held)  # only whitespace so far: a call may still start
                    content += held[: len(held) - keep]
                    held = held[len(held) - keep :]
                    break
                content += held[:at]
                held = held[at + len(self._open) :]
                self._in_calls = True
            elif self._close is None:
                break  # the calls run to the end of the output
            else:
                end = held.find(self._close)
                if end == -1:
                    break
                parsed = _parse_calls(held[:end], self._args_key)
                if parsed is None:  # not a call after all: keep it as text
                    content += self._open + held[: end + len(self._close)]
                else:
                    calls += parsed if self.parallel else parsed[:1]
                held = held[end + len(self._close) :]
                self._in_calls = False
                if calls and not self.parallel:
                    self.done = True
                    held = ""
                    break
        self._held = held
        if content.strip():
            self._seen_content = True
        self.calls += calls
        return content, calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The output ended: parse what is left (an unclosed call), else release it as content."""
        held, self._held = self._held, ""
        if self.done or not held:
            return "", []
        if not self._in_calls:
            return held, []
        parsed = _parse_calls(held, self._args_key)
        if parsed is None and self.forced:
            return "", []  # a forced call cut short (max_tokens): not content
        if parsed is None:
            prefix = "" if (self.fmt is ToolFormat.llama3 and held.lstrip().startswith("{")) else self._open
            return prefix + held, []
        calls = parsed if self.parallel else parsed[:1]
        self.calls += calls
        return "", calls
