"""Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``) on the same
engine path as chat completions.

A request is translated once into what chat completions builds (messages, sampling, the
:class:`~ipc.records.Generation` with tools), so it gets the same tool formats, grammars,
admission and metrics; only the shape of the answer differs (:class:`MessageShape`): content
blocks (``text``, ``tool_use``), Anthropic's stop reasons, and its named stream events
(``message_start``, ``content_block_start``/``delta``/``stop`` with ``text_delta`` and
``input_json_delta``, ``message_delta`` with the stop reason and usage, ``message_stop``).
Errors on these routes come in Anthropic's error shape (:func:`axserving.errors.body_for`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import msgspec
import orjson

from axserving import protocol
from axserving.engine.stream import Chunk
from axserving.errors import APIError, InvalidRequest, anthropic_body
from axserving.protocol import RequestSampling
from axserving.responses import Choice, Shape
from axserving.sse import Event
from ipc.records import ChatMessage, Generation, ToolCall

# ---- request types ---------------------------------------------------------------------------------


class TextBlock(msgspec.Struct, tag_field="type", tag="text"):
    text: str
    cache_control: Any = None


class ImageBlock(msgspec.Struct, tag_field="type", tag="image"):
    source: Any = None


class DocumentBlock(msgspec.Struct, tag_field="type", tag="document"):
    source: Any = None


class ToolUseBlock(msgspec.Struct, tag_field="type", tag="tool_use"):
    id: str
    name: str
    input: dict[str, Any] = {}


class ToolResultBlock(msgspec.Struct, tag_field="type", tag="tool_result"):
    tool_use_id: str
    content: Union[str, list[Union[TextBlock, ImageBlock]], None] = None
    is_error: bool = False


class ThinkingBlock(msgspec.Struct, tag_field="type", tag="thinking"):
    thinking: str = ""
    signature: str = ""


Block = Union[TextBlock, ImageBlock, DocumentBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock]


class InputMessage(msgspec.Struct):
    role: Literal["user", "assistant"]
    content: Union[str, list[Block]]


class ToolSpec(msgspec.Struct):
    name: str
    input_schema: dict[str, Any] = {}
    description: str = ""
    type: str | None = None  # custom tools; server tools (web_search_...) are refused


class ToolChoiceSpec(msgspec.Struct):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class MessagesRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    messages: list[InputMessage]
    max_tokens: int
    system: Union[str, list[TextBlock], None] = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: protocol.Int32 | None = None
    stream: bool = False
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoiceSpec | None = None
    metadata: Any = None
    thinking: Any = None
    service_tier: str | None = None


class CountTokensRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    messages: list[InputMessage]
    system: Union[str, list[TextBlock], None] = None
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoiceSpec | None = None
    thinking: Any = None


# ---- translation -----------------------------------------------------------------------------------


def _text(blocks: str | list[TextBlock] | list[TextBlock | ImageBlock] | None, where: str) -> str:
    if blocks is None:
        return ""
    if isinstance(blocks, str):
        return blocks
    parts = []
    for j, b in enumerate(blocks):
        if not isinstance(b, TextBlock):
            raise InvalidRequest("only text content is supported by this model", param=f"{where}[{j}].type")
        parts.append(b.text)
    return "".join(parts)


def messages(req: MessagesRequest | CountTokensRequest) -> tuple[ChatMessage, ...]:
    """The conversation as chat messages: the system prompt first, tool_use blocks as an
    assistant's tool calls, tool_result blocks as tool messages."""
    if req.thinking is not None and not (isinstance(req.thinking, dict) and req.thinking.get("type") == "disabled"):
        raise InvalidRequest("extended thinking is not supported", param="thinking")
    if not req.messages:
        raise InvalidRequest("messages: at least one message is required", param="messages")
    out: list[ChatMessage] = []
    system = _text(req.system, "system")
    if system:
        out.append(ChatMessage("system", system))
    for i, m in enumerate(req.messages):
        where = f"messages[{i}].content"
        if isinstance(m.content, str):
            out.append(ChatMessage(m.role, m.content))
            continue
        if not m.content and not (m.role == "assistant" and i == len(req.messages) - 1):
            raise InvalidRequest(
                f"messages[{i}]: all messages must have non-empty content except for the optional final "
                "assistant message", param=where,
            )
        texts: list[str] = []
        calls: list[ToolCall] = []
        for j, b in enumerate(m.content):
            if isinstance(b, TextBlock):
                texts.append(b.text)
            elif isinstance(b, ThinkingBlock):
                continue  # earlier thinking is not fed back
            elif isinstance(b, ToolUseBlock):
                if m.role != "assistant":
                    raise InvalidRequest("tool_use blocks belong to assistant messages", param=f"{where}[{j}]")
                calls.append(ToolCall(b.id, b.name, json.dumps(b.input, ensure_ascii=False)))
            elif isinstance(b, ToolResultBlock):
                if m.role != "user":
                    raise InvalidRequest("tool_result blocks belong to user messages", param=f"{where}[{j}]")
                result = _text(b.content, f"{where}[{j}].content")
                out.append(ChatMessage("tool", f"Error: {result}" if b.is_error else result, tool_call_id=b.tool_use_id))
            else:
                raise InvalidRequest("only text, tool_use and tool_result content is supported by this model",
                                     param=f"{where}[{j}].type")
        if texts or calls:
            out.append(ChatMessage(m.role, "".join(texts), tool_calls=tuple(calls)))
    if not any(m.role != "system" for m in out):
        raise InvalidRequest("messages: the conversation has no content", param="messages")
    return tuple(out)


def generation(req: MessagesRequest | CountTokensRequest) -> Generation:
    """Tools and tool_choice, validated as chat completions validates them."""
    tools: list[Any] = []
    for i, t in enumerate(req.tools or ()):
        if t.type not in (None, "custom"):
            raise InvalidRequest(f"server tools ({t.type}) are not supported", param=f"tools[{i}].type")
        tools.append({"type": "function", "function": {
            "name": t.name, "description": t.description, "parameters": t.input_schema or {"type": "object"}}})
    choice: Any = None
    parallel: bool | None = None
    tc = req.tool_choice
    if tc is not None:
        choice = {"auto": "auto", "any": "required", "none": "none"}.get(tc.type)
        if tc.type == "tool":
            if not tc.name:
                raise InvalidRequest("tool_choice of type 'tool' needs 'name'", param="tool_choice.name")
            choice = {"type": "function", "function": {"name": tc.name}}
        parallel = False if tc.disable_parallel_tool_use else None
    body = {"messages": [{"role": "user", "content": "x"}], "tools": tools or None, "tool_choice": choice,
            "parallel_tool_calls": parallel}
    chat = msgspec.convert(body, protocol.ChatCompletionRequest)
    return protocol.generation(chat)


def sampling(req: MessagesRequest) -> RequestSampling:
    if req.max_tokens < 1:
        raise InvalidRequest("max_tokens: must be at least 1", param="max_tokens")
    if req.temperature is not None and not 0 <= req.temperature <= 1:
        raise InvalidRequest("temperature: must be between 0 and 1", param="temperature")
    body = {"messages": [], "max_tokens": req.max_tokens, "temperature": req.temperature, "top_p": req.top_p,
            "top_k": req.top_k, "stop": req.stop_sequences}
    return protocol.sampling_params(msgspec.convert(body, protocol.ChatCompletionRequest))


# ---- the answer ------------------------------------------------------------------------------------

STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}


def stop_reason(finish: str | None, stop_sequence: str) -> str | None:
    if finish == "stop":
        return "stop_sequence" if stop_sequence else "end_turn"
    return STOP_REASONS.get(finish or "", finish)


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": json.loads(call.arguments or "{}")}


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens - cached_tokens, "output_tokens": completion_tokens,
            "cache_read_input_tokens": cached_tokens, "cache_creation_input_tokens": 0}


def _event(kind: str, body: dict[str, Any]) -> Event:
    return kind, orjson.dumps({"type": kind, **body}).decode()


@dataclass
class MessageShape(Shape):
    id_prefix = "msg"

    _block: int = -1  # the open content block's index
    _open_text: bool = False
    _stop: str | None = field(default=None)
    _stop_sequence: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"msg_{uuid.uuid4().hex[:24]}"

    def _message(self, content: list[dict[str, Any]], stop: str | None, stop_sequence: str | None,
                 usage: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop, "stop_sequence": stop_sequence, "usage": usage}

    def complete(
        self, choices: list[Choice], prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> dict[str, Any]:
        c = choices[0]
        content: list[dict[str, Any]] = [{"type": "text", "text": c.text}] if c.text or not c.tool_calls else []
        content += [_tool_use(call) for call in c.tool_calls]
        return self._message(content, stop_reason(c.finish_reason, c.stop_sequence), c.stop_sequence or None,
                             _usage(prompt_tokens, completion_tokens, cached_tokens))

    # streaming

    def first_chunks(self, first: Chunk | None) -> list[Event]:
        prompt = first.prompt_tokens if first else 0
        cached = first.cached_tokens if first else 0
        start = self._message([], None, None, _usage(prompt, 0, cached))
        return [_event("message_start", {"message": start}), _event("ping", {})]

    def chunks(self, chunk: Chunk) -> list[Event]:
        out: list[Event] = []
        if chunk.text:
            if not self._open_text:
                self._block += 1
                self._open_text = True
                out.append(_event("content_block_start", {"index": self._block, "content_block": {"type": "text", "text": ""}}))
            out.append(_event("content_block_delta", {"index": self._block, "delta": {"type": "text_delta", "text": chunk.text}}))
        for call in chunk.tool_calls:
            if self._open_text:
                out.append(_event("content_block_stop", {"index": self._block}))
                self._open_text = False
            self._block += 1
            block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
            out.append(_event("content_block_start", {"index": self._block, "content_block": block}))
            out.append(_event("content_block_delta", {"index": self._block,
                                                      "delta": {"type": "input_json_delta", "partial_json": call.arguments}}))
            out.append(_event("content_block_stop", {"index": self._block}))
        if chunk.finish_reason:
            self._stop = stop_reason(chunk.finish_reason, chunk.stop_sequence)
            self._stop_sequence = chunk.stop_sequence
        return out

    def final_events(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> list[Event]:
        out: list[Event] = []
        if self._open_text:
            out.append(_event("content_block_stop", {"index": self._block}))
            self._open_text = False
        delta = {"stop_reason": self._stop, "stop_sequence": self._stop_sequence or None}
        out.append(_event("message_delta", {"delta": delta, "usage": {"output_tokens": completion_tokens}}))
        out.append(_event("message_stop", {}))
        return out

    def error_events(self, err: APIError) -> list[Event]:
        return [("error", orjson.dumps(anthropic_body(err)).decode())]


class CountShape(Shape):
    def complete(
        self, choices: list[Choice], prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> dict[str, Any]:
        return {"input_tokens": prompt_tokens}

