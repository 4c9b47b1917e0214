"""OpenAI's Responses API (``POST /v1/responses``), stateless, on the chat completions path.

A request is rewritten once into a chat completions request and validated by the same code
(:mod:`axserving.protocol`): ``instructions`` become the system message, ``input`` items become
messages (``function_call`` items an assistant's tool calls, ``function_call_output`` items tool
results), ``text.format`` becomes ``response_format``, function tools become chat tools, and
``max_output_tokens`` becomes ``max_tokens``. A 400 names the Responses field, not the chat one.
:class:`ResponseShape` renders the answer as output items (``message`` with ``output_text``,
``function_call``) and streams the typed events, each with its ``sequence_number``.

``previous_response_id`` and ``store: true`` are refused (nothing is stored).
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import msgspec
import orjson

from axserving import protocol
from axserving.engine.stream import Chunk
from axserving.errors import APIError, InvalidRequest
from axserving.responses import Choice, Shape
from axserving.sse import Event
from ipc.records import ToolCall


class InputText(msgspec.Struct, tag_field="type", tag="input_text"):
    text: str


class OutputText(msgspec.Struct, tag_field="type", tag="output_text"):
    text: str
    annotations: Any = None


class InputImage(msgspec.Struct, tag_field="type", tag="input_image"):
    image_url: Any = None


class InputFile(msgspec.Struct, tag_field="type", tag="input_file"):
    file_id: Any = None


class Refusal(msgspec.Struct, tag_field="type", tag="refusal"):
    refusal: str = ""


Part = Union[InputText, OutputText, InputImage, InputFile, Refusal]


class MessageItem(msgspec.Struct, tag_field="type", tag="message"):
    role: Literal["user", "assistant", "system", "developer"]
    content: Union[str, list[Part]]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(msgspec.Struct, tag_field="type", tag="function_call"):
    call_id: str
    name: str
    arguments: str = "{}"
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(msgspec.Struct, tag_field="type", tag="function_call_output"):
    call_id: str
    output: Union[str, list[Part]]
    id: str | None = None
    status: str | None = None


class ReasoningItem(msgspec.Struct, tag_field="type", tag="reasoning"):
    id: str | None = None
    summary: Any = None


class BareMessage(msgspec.Struct):
    """A message written without ``"type": "message"`` (EasyInputMessage)."""

    role: Literal["user", "assistant", "system", "developer"]
    content: Union[str, list[Part]]


Item = Union[MessageItem, FunctionCallItem, FunctionCallOutputItem, ReasoningItem]


class Format(msgspec.Struct):
    type: str
    name: str | None = None
    schema: Union[dict[str, Any], bool, None] = None
    strict: bool | None = None
    description: str | None = None


class TextOptions(msgspec.Struct):
    format: Format | None = None
    verbosity: str | None = None


class FunctionTool(msgspec.Struct):
    type: str
    name: str | None = None
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedChoice(msgspec.Struct):
    type: str
    name: str | None = None


class ResponsesRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    input: Union[str, list[Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    text: TextOptions | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedChoice, None] = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    top_logprobs: int | None = None
    reasoning: Any = None
    truncation: str | None = None
    seed: protocol.Seed | None = None  # an extension, as chat's


# Chat's field names as the Responses API spells them, for the param of a 400.
_PARAMS = [
    (re.compile(r"^messages\[\d+\]"), "input"),
    (re.compile(r"^max_tokens"), "max_output_tokens"),
    (re.compile(r"^response_format\.json_schema\.schema"), "text.format.schema"),
    (re.compile(r"^response_format(\.type)?"), "text.format.type"),
    (re.compile(r"^tools\[(\d+)\]\.function\.(\w+)"), r"tools[\1].\2"),
    (re.compile(r"^logprobs|^top_logprobs"), "top_logprobs"),
]


def _param(param: str | None) -> str | None:
    for pattern, repl in _PARAMS:
        if param and pattern.search(param):
            return pattern.sub(repl, param, count=1)
    return param


def _text(content: str | list[Part], where: str) -> str:
    if isinstance(content, str):
        return content
    out = []
    for j, part in enumerate(content):
        if isinstance(part, (InputText, OutputText)):
            out.append(part.text)
        elif isinstance(part, Refusal):
            out.append(part.refusal)
        else:
            raise InvalidRequest("only text input is supported by this model", param=f"{where}.content[{j}].type")
    return "".join(out)


def _messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The input as chat completions messages (OpenAI's own JSON shape)."""
    out: list[dict[str, Any]] = []
    if req.instructions:
        out.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        return [*out, {"role": "user", "content": req.input}]
    if not req.input:
        raise InvalidRequest("'input' must not be empty", param="input")
    for i, raw in enumerate(req.input):
        where = f"input[{i}]"
        try:
            item: Any = (msgspec.convert(raw, Item) if isinstance(raw, dict) and "type" in raw
                         else msgspec.convert(raw, BareMessage))
        except msgspec.ValidationError as e:
            raise InvalidRequest(f"Invalid input item: {e}", param=where) from e
        if isinstance(item, (MessageItem, BareMessage)):
            out.append({"role": item.role, "content": _text(item.content, where)})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") is not None:
                out[-1]["tool_calls"].append(call)  # consecutive calls are one assistant turn
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output, where)})
    return out


def chat_request(req: ResponsesRequest) -> protocol.ChatCompletionRequest:
    """The equivalent chat completions request (validated there; see :func:`translated`)."""
    if req.previous_response_id is not None:
        raise InvalidRequest("stored responses are not kept here; send the whole conversation in 'input'",
                             param="previous_response_id")
    if req.store:
        raise InvalidRequest("responses are not stored here; leave 'store' unset or false", param="store")
    body: dict[str, Any] = {
        "model": req.model, "messages": _messages(req), "max_tokens": req.max_output_tokens,
        "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed,
        "parallel_tool_calls": req.parallel_tool_calls,
    }
    fmt = req.text.format if req.text else None
    if fmt is not None:
        if fmt.type == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.name or "response", "schema": fmt.schema, "strict": fmt.strict}}
        else:
            body["response_format"] = {"type": fmt.type}
    if req.tools:
        tools = []
        for i, t in enumerate(req.tools):
            if t.type != "function" or not t.name:
                raise InvalidRequest(f"only function tools are supported, got {t.type!r}", param=f"tools[{i}].type")
            tools.append({"type": "function", "function": {"name": t.name, "description": t.description,
                                                           "parameters": t.parameters, "strict": t.strict}})
        body["tools"] = tools
    choice = req.tool_choice
    if isinstance(choice, NamedChoice):
        if choice.type != "function" or not choice.name:
            raise InvalidRequest("tool_choice must name a function", param="tool_choice")
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    else:
        body["tool_choice"] = choice
    if req.top_logprobs:
        body["logprobs"], body["top_logprobs"] = True, req.top_logprobs
    try:
        return msgspec.convert(body, protocol.ChatCompletionRequest)
    except msgspec.ValidationError as e:
        raise InvalidRequest(f"Invalid request: {e}") from e


def translated(req: ResponsesRequest) -> tuple[Any, ...]:
    """Messages, sampling and generation options, with 400s naming the Responses fields."""
    try:
        chat = chat_request(req)
        return protocol.chat_messages(chat), protocol.sampling_params(chat), protocol.generation(chat)
    except InvalidRequest as e:
        e.param = _param(e.param)
        raise


# ---- the answer ----------------------------------------------------------------------------------


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens}


def _call_item(call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": "fc_" + call.id.removeprefix("call_"), "call_id": call.id,
            "name": call.name, "arguments": call.arguments if status == "completed" else "", "status": status}


@dataclass
class ResponseShape(Shape):
    request: ResponsesRequest | None = None
    _seq: int = 0
    _msg_id: str = ""
    _text: list[str] = field(default_factory=list)
    _output: list[dict[str, Any]] = field(default_factory=list)
    _message_open: bool = False
    _finish: str | None = None

    def __post_init__(self) -> None:
        self.id = self.id or f"resp_{uuid.uuid4().hex}"
        self._msg_id = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _body(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None,
              finish: str | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        req = self.request
        fmt: Any = {"type": "text"}
        if req and req.text and req.text.format:
            fmt = msgspec.to_builtins(req.text.format)
        incomplete = {"reason": "max_output_tokens"} if finish == "length" else None
        return {
            "id": self.id, "object": "response", "created_at": self.created,
            "status": "incomplete" if incomplete and status == "completed" else status,
            "model": self.model, "output": output, "usage": usage, "error": error,
            "incomplete_details": incomplete,
            "instructions": req.instructions if req else None,
            "max_output_tokens": req.max_output_tokens if req else None,
            "temperature": req.temperature if req else None, "top_p": req.top_p if req else None,
            "parallel_tool_calls": True if not req or req.parallel_tool_calls is None else req.parallel_tool_calls,
            "tool_choice": (msgspec.to_builtins(req.tool_choice) if req and req.tool_choice else "auto"),
            "tools": msgspec.to_builtins(req.tools) if req and req.tools else [],
            "text": {"format": fmt}, "previous_response_id": None, "store": False, "metadata": {},
        }

    def _message(self, text: str, status: str) -> dict[str, Any]:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"type": "message", "id": self._msg_id, "status": status, "role": "assistant",
                "content": [part] if status == "completed" else []}

    def complete(
        self, choices: list[Choice], prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> dict[str, Any]:
        c = choices[0]
        output = [self._message(c.text, "completed")] if c.text or not c.tool_calls else []
        output += [_call_item(call) for call in c.tool_calls]
        return self._body("completed", output, _usage(prompt_tokens, completion_tokens, cached_tokens), c.finish_reason)

    # streaming

    def _event(self, kind: str, **body: Any) -> Event:
        self._seq += 1
        return kind, orjson.dumps({"type": kind, "sequence_number": self._seq - 1, **body}).decode()

    def first_chunks(self, first: Chunk | None) -> list[Event]:
        head = self._body("in_progress", [], None)
        return [self._event("response.created", response=head), self._event("response.in_progress", response=head)]

    def _close_message(self) -> list[Event]:
        if not self._message_open:
            return []
        self._message_open = False
        text = "".join(self._text)
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        index = len(self._output)
        item = self._message(text, "completed")
        self._output.append(item)
        ids = {"item_id": self._msg_id, "output_index": index, "content_index": 0}
        return [self._event("response.output_text.done", text=text, logprobs=[], **ids),
                self._event("response.content_part.done", part=part, **ids),
                self._event("response.output_item.done", output_index=index, item=item)]

    def chunks(self, chunk: Chunk) -> list[Event]:
        out: list[Event] = []
        index = len(self._output)
        if chunk.text:
            if not self._message_open:
                self._message_open = True
                out.append(self._event("response.output_item.added", output_index=index,
                                       item=self._message("", "in_progress")))
                out.append(self._event("response.content_part.added", item_id=self._msg_id, output_index=index,
                                       content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
            self._text.append(chunk.text)
            out.append(self._event("response.output_text.delta", item_id=self._msg_id, output_index=index,
                                   content_index=0, delta=chunk.text, logprobs=[]))
        for call in chunk.tool_calls:
            out += self._close_message()
            index = len(self._output)
            item = _call_item(call)
            out.append(self._event("response.output_item.added", output_index=index, item=_call_item(call, "in_progress")))
            out.append(self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                   delta=call.arguments))
            out.append(self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                   arguments=call.arguments))
            out.append(self._event("response.output_item.done", output_index=index, item=item))
            self._output.append(item)
        if chunk.finish_reason:
            self._finish = chunk.finish_reason
        return out

    def final_events(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> list[Event]:
        out = self._close_message()
        body = self._body("completed", self._output, _usage(prompt_tokens, completion_tokens, cached_tokens), self._finish)
        kind = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
        out.append(self._event(kind, response=body))
        return out

    def error_events(self, err: APIError) -> list[Event]:
        failed = self._body("failed", self._output, None, error={"code": err.code or err.type, "message": err.message})
        return [self._event("response.failed", response=failed)]
