"""OpenAI request types, parsed and validated once at the edge.

:func:`parse` turns a raw body into a typed request (400 naming the field on a wrong type or a
missing field); :func:`sampling_params` and :func:`chat_messages` check ranges (the reference
server's status codes: 400 or 422) and produce the engine-side records.
"""

from __future__ import annotations

import array
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union

import msgspec

from axserving.config import SamplingDefaults
from axserving.errors import InvalidRequest, UnprocessableRequest
from engine_proc import grammar as grammar_rules
from ipc.records import (
    ChatMessage,
    Generation,
    SamplingParams,
    Tool,
    ToolCall,
    ToolChoice,
)

MAX_STOP_SEQUENCES = 16
_MODEL_ID = re.compile(r"^[A-Za-z0-9._-]+$")
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class TextPart(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class ImagePart(msgspec.Struct, tag_field="type", tag="image_url"):
    image_url: Any = None


class InputAudioPart(msgspec.Struct, tag_field="type", tag="input_audio"):
    input_audio: Any = None


class FilePart(msgspec.Struct, tag_field="type", tag="file"):
    file: Any = None


class RefusalPart(msgspec.Struct, tag_field="type", tag="refusal"):
    refusal: str = ""


ContentPart = Union[TextPart, ImagePart, InputAudioPart, FilePart, RefusalPart]


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str = "{}"


class MessageToolCall(msgspec.Struct):
    function: FunctionCall
    id: str = ""
    type: Literal["function"] = "function"


class Message(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(msgspec.Struct):
    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(msgspec.Struct):
    function: FunctionDef
    type: Literal["function"] = "function"


class ToolChoiceFunction(msgspec.Struct):
    name: str


class NamedToolChoice(msgspec.Struct):
    function: ToolChoiceFunction
    type: Literal["function"] = "function"


class JsonSchemaSpec(msgspec.Struct):
    name: str = "response"
    schema: Union[dict[str, Any], bool, None] = None
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(msgspec.Struct):
    type: str
    json_schema: JsonSchemaSpec | None = None
    schema: dict[str, Any] | None = None  # llama.cpp's extension: a schema for json_object


# Integers bounded where the engine's records can carry them (int64 seeds; llama.cpp's
# top_k: int32): past that a value is a 400 naming the field, not an overflow deep in the encoder.
Int32 = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Sampling(msgspec.Struct, kw_only=True):
    model: str | None = None  # None: the server's default model
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int32 | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: Seed | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False
    user: str | None = None
    priority: str | None = None  # critical, high, normal, low, background (else X-Priority)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    grammar: str | None = None  # llama.cpp's extension: GBNF
    json_schema: dict[str, Any] | None = None  # llama.cpp's extension: a bare schema


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: list[Message]
    max_completion_tokens: int | None = None
    # Fields we know and cannot honour: a 400 naming them, not silence (see _unsupported).
    audio: Any = None
    modalities: list[str] | None = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Sampling, kw_only=True):
    # A string, or (OpenAI) a list of one string, a list of token ids, or a list of one such list.
    prompt: Union[str, list[Any]]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None  # legacy: how many top alternatives (0-5; we allow 20)


R = TypeVar("R", ChatCompletionRequest, CompletionRequest)
S = TypeVar("S", bound=msgspec.Struct)


def parse(body: bytes, kind: type[S]) -> S:
    if not body.strip():
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        text = str(e)
        param = None
        if " - at `$." in text:
            text, _, where = text.rpartition(" - at `$.")
            param = where.rstrip("`")
        missing = re.match(r"Object missing required field `(\w+)`", text)
        if missing:
            field = missing.group(1)
            param = f"{param}.{field}" if param else field
            text = f"'{field}' is a required property"
        where_txt = f" (at '{param}')" if param else ""
        raise InvalidRequest(f"Invalid request: {text}{where_txt}", param=param) from e
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {e}") from e
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"The request body is not valid UTF-8: {e.reason} at byte {e.start}") from e
    except RecursionError as e:
        raise InvalidRequest("The JSON body is nested too deeply") from e


def check_model_id(model: str) -> None:
    if not model:
        raise InvalidRequest("'model' must not be empty", param="model")
    if len(model.encode()) > 128:
        raise InvalidRequest("'model' is longer than 128 bytes", param="model")
    if not _MODEL_ID.match(model):
        raise UnprocessableRequest(
            "'model' may only contain letters, digits, '-', '_' and '.'", param="model"
        )


def _in_range(name: str, value: float | None, lo: float, hi: float, lo_open: bool = False) -> None:
    if value is None:
        return
    bad = value < lo or value > hi or (lo_open and value == lo)
    if bad:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise UnprocessableRequest(f"'{name}' must be in {interval}, got {value}", param=name)


@dataclass(frozen=True, slots=True)
class RequestSampling:
    """A request's sampling settings, validated; None where the request left one out (the
    model's defaults fill those in, see :meth:`resolve`)."""

    max_tokens: int | None
    max_tokens_param: str  # the field max_tokens came from (max_completion_tokens in chat)
    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    repeat_penalty: float | None
    frequency_penalty: float
    presence_penalty: float
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool

    @classmethod
    def unset(cls) -> RequestSampling:
        """Nothing asked for (requests that do not sample: tokenize, apply-template)."""
        return cls(None, "max_tokens", None, None, None, None, None, 0.0, 0.0, None, (), False)

    def resolve(self, defaults: SamplingDefaults, default_max_tokens: int) -> SamplingParams:
        """The request's values, else the model's (config, then the file's own), else OpenAI's."""

        def pick(mine: Any, model: Any, fallback: Any) -> Any:
            return mine if mine is not None else model if model is not None else fallback

        return SamplingParams(
            max_tokens=pick(self.max_tokens, defaults.max_tokens, default_max_tokens),
            temperature=pick(self.temperature, defaults.temperature, 1.0),
            top_p=pick(self.top_p, defaults.top_p, 1.0),
            top_k=pick(self.top_k, defaults.top_k, 0),
            min_p=pick(self.min_p, defaults.min_p, 0.0),
            repeat_penalty=pick(self.repeat_penalty, defaults.repeat_penalty, 1.0),
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            seed=self.seed,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
        )


def sampling_params(req: ChatCompletionRequest | CompletionRequest) -> RequestSampling:
    if req.model is not None:
        check_model_id(req.model)
    max_tokens = req.max_tokens
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        max_tokens = req.max_completion_tokens
    param = "max_tokens"
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        param = "max_completion_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequest(f"'{param}' must be at least 1, got {max_tokens}", param=param)
    _in_range("temperature", req.temperature, 0, 2)
    _in_range("top_p", req.top_p, 0, 1)
    _in_range("min_p", req.min_p, 0, 1)
    if req.top_k is not None and req.top_k < 1:
        raise UnprocessableRequest(f"'top_k' must be at least 1, got {req.top_k}", param="top_k")
    _in_range("repeat_penalty", req.repeat_penalty, 0, 10, lo_open=True)
    _in_range("frequency_penalty", req.frequency_penalty, -2, 2)
    _in_range("presence_penalty", req.presence_penalty, -2, 2)
    stop: tuple[str, ...] = ()
    if isinstance(req.stop, str):
        stop = (req.stop,) if req.stop else ()
    elif req.stop:
        stop = tuple(s for s in req.stop if s)
    if len(stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed", param="stop")
    return RequestSampling(
        max_tokens=max_tokens,
        max_tokens_param=param,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        repeat_penalty=req.repeat_penalty,
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        seed=req.seed,
        stop=stop,
        ignore_eos=req.ignore_eos,
    )


def chat_messages(req: ChatCompletionRequest) -> tuple[ChatMessage, ...]:
    if not req.messages:
        raise InvalidRequest("'messages' must contain at least one message", param="messages")
    out = []
    for i, m in enumerate(req.messages):
        if m.content is None:
            text = ""
        elif isinstance(m.content, str):
            text = m.content
        else:
            parts = []
            for part in m.content:
                if isinstance(part, RefusalPart):
                    parts.append(part.refusal)
                    continue
                if not isinstance(part, TextPart):
                    kind = type(part).__struct_config__.tag
                    raise InvalidRequest(
                        f"content parts of type '{kind}' are not supported by this model (text only)",
                        param=f"messages[{i}].content[{m.content.index(part)}].type",
                    )
                parts.append(part.text)
            text = "".join(parts)
        calls: tuple[ToolCall, ...] = ()
        if m.tool_calls:
            if m.role != "assistant":
                raise InvalidRequest("only assistant messages carry 'tool_calls'", param=f"messages[{i}].tool_calls")
            calls = tuple(
                ToolCall(c.id, c.function.name, _arguments_json(c.function.arguments, f"messages[{i}].tool_calls[{j}]"))
                for j, c in enumerate(m.tool_calls)
            )
        if m.role == "tool" and not m.tool_call_id:
            raise InvalidRequest("a tool message needs 'tool_call_id'", param=f"messages[{i}].tool_call_id")
        out.append(ChatMessage(role=m.role, content=text, name=m.name, tool_calls=calls, tool_call_id=m.tool_call_id))
    return tuple(out)


def _arguments_json(arguments: str, where: str) -> str:
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        raise InvalidRequest("'arguments' must be a JSON object (as text)", param=f"{where}.function.arguments") from None
    if not isinstance(value, dict):
        raise InvalidRequest("'arguments' must be a JSON object (as text)", param=f"{where}.function.arguments")
    return json.dumps(value, ensure_ascii=False)


MAX_N = 16
MAX_LOGPROBS = 20


def generation(req: ChatCompletionRequest | CompletionRequest) -> Generation:
    """What the request asks of the output beyond sampling, validated: choices, logprobs,
    logit bias, a grammar (response_format, grammar, json_schema) and tools."""
    if not 1 <= req.n <= MAX_N:
        raise InvalidRequest(f"'n' must be between 1 and {MAX_N}, got {req.n}", param="n")
    logprobs = -1
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None:
            if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
                raise InvalidRequest(f"'top_logprobs' must be between 0 and {MAX_LOGPROBS}", param="top_logprobs")
            if not req.logprobs:
                raise InvalidRequest("'top_logprobs' requires 'logprobs' to be true", param="top_logprobs")
        if req.logprobs:
            logprobs = req.top_logprobs or 0
    elif req.logprobs is not None:
        if not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"'logprobs' must be between 0 and {MAX_LOGPROBS}", param="logprobs")
        logprobs = req.logprobs
        if req.echo:
            raise InvalidRequest("'echo' with 'logprobs' (the prompt's logprobs) is not supported", param="echo")
    bias: list[tuple[int, float]] = []
    for key, value in (req.logit_bias or {}).items():
        if not key.strip().isdigit():
            raise InvalidRequest(f"'logit_bias' keys must be token ids, got {key!r}", param="logit_bias")
        if not -100 <= value <= 100:
            raise InvalidRequest(f"'logit_bias' values must be between -100 and 100, got {value}", param="logit_bias")
        bias.append((int(key), float(value)))
    grammar = _grammar(req)
    gen = Generation(n=req.n, logprobs=logprobs, logit_bias=tuple(bias), grammar=grammar)
    if isinstance(req, CompletionRequest):
        return msgspec.structs.replace(gen, echo=req.echo)
    return _with_tools(req, gen)


def _grammar(req: ChatCompletionRequest | CompletionRequest) -> str | None:
    asked = [f for f in ("response_format", "grammar", "json_schema") if getattr(req, f) is not None]
    rf = req.response_format
    if rf is not None and rf.type == "text":
        asked.remove("response_format")
    if len(asked) > 1:
        raise InvalidRequest(f"'{asked[0]}' and '{asked[1]}' cannot be used together", param=asked[1])
    try:
        if req.grammar is not None:
            return grammar_rules.gbnf_grammar(req.grammar)
        if req.json_schema is not None:
            return grammar_rules.json_schema_grammar(req.json_schema)
    except grammar_rules.GrammarError as e:
        field = "grammar" if req.grammar is not None else "json_schema"
        raise InvalidRequest(f"'{field}' cannot be used: {e}", param=field) from e
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        param, schema, strict = "response_format.schema", rf.schema or True, False
    elif rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema is None:
            raise InvalidRequest("'response_format.json_schema.schema' is required", param="response_format.json_schema.schema")
        param, schema, strict = "response_format.json_schema.schema", rf.json_schema.schema, bool(rf.json_schema.strict)
    else:
        raise InvalidRequest(
            f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {rf.type!r}",
            param="response_format.type",
        )
    try:
        return grammar_rules.json_schema_grammar(schema, strict=strict)
    except grammar_rules.GrammarError as e:
        raise InvalidRequest(f"the schema cannot be used: {e}", param=param) from e


def _unsupported(req: ChatCompletionRequest) -> None:
    if req.audio is not None or (req.modalities and set(req.modalities) - {"text"}):
        raise InvalidRequest("audio output is not supported; this server generates text", param="audio" if req.audio is not None else "modalities")
    if req.web_search_options is not None:
        raise InvalidRequest("web search is not supported", param="web_search_options")
    for legacy in ("functions", "function_call"):
        if getattr(req, legacy) is not None:
            raise InvalidRequest(f"'{legacy}' is deprecated and not supported; use 'tools' and 'tool_choice'", param=legacy)


def _with_tools(req: ChatCompletionRequest, gen: Generation) -> Generation:
    _unsupported(req)
    tools: list[Tool] = []
    names: set[str] = set()
    for i, t in enumerate(req.tools or ()):
        f = t.function
        if not _TOOL_NAME.match(f.name):
            raise InvalidRequest(
                "a function name is 1-64 letters, digits, '_' or '-'", param=f"tools[{i}].function.name"
            )
        if f.name in names:
            raise InvalidRequest(f"two tools are named {f.name!r}", param=f"tools[{i}].function.name")
        names.add(f.name)
        params = f.parameters or {"type": "object"}
        try:
            grammar_rules.json_schema_grammar(params, strict=bool(f.strict))
        except grammar_rules.GrammarError as e:
            raise InvalidRequest(f"the parameters schema cannot be used: {e}", param=f"tools[{i}].function.parameters") from e
        tools.append(Tool(f.name, f.description, json.dumps(params)))
    choice = req.tool_choice
    kind, name = ToolChoice.auto, None
    if isinstance(choice, NamedToolChoice):
        kind, name = ToolChoice.named, choice.function.name
        if name not in names:
            raise InvalidRequest(f"tool_choice names {name!r}, which is not in 'tools'", param="tool_choice")
    elif choice is not None:
        kind = ToolChoice(choice)
    if kind in (ToolChoice.required, ToolChoice.named) and not tools:
        raise InvalidRequest("'tool_choice' requires 'tools'", param="tool_choice")
    if kind in (ToolChoice.required, ToolChoice.named) and gen.grammar is not None:
        raise InvalidRequest("a forced tool call and 'response_format' cannot be used together", param="tool_choice")
    if not tools:
        return gen
    # A forced call is one call unless parallel calls are asked for by name (as llama-server
    # does): a small model, free to go on, repeats the call until max_tokens.
    forced = kind in (ToolChoice.required, ToolChoice.named)
    parallel = not forced if req.parallel_tool_calls is None else req.parallel_tool_calls
    return msgspec.structs.replace(gen, tools=tuple(tools), tool_choice=kind, tool_name=name, parallel_tool_calls=parallel)


MAX_TOKEN_ID = (1 << 31) - 1


def completion_prompt(req: CompletionRequest) -> str | array.array[int]:
    """The prompt as text, or as token ids packed in an int32 array (sent to the engine as is)."""
    if req.suffix:
        raise InvalidRequest("'suffix' is not supported", param="suffix")
    prompt: Any = req.prompt
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return prompt
    if prompt and all(type(t) is int and 0 <= t <= MAX_TOKEN_ID for t in prompt):
        return array.array("i", prompt)
    raise InvalidRequest(
        "'prompt' must be a string, a list of token ids, or a list holding exactly one of those",
        param="prompt",
    )


def include_usage(req: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """llama-server's /tokenize (``content``), or a chat's prompt (``messages``, with ``tools``)."""

    model: str | None = None
    content: str | None = None
    messages: list[Message] | None = None
    tools: list[ToolDef] | None = None
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    tokens: list[int]


class ApplyTemplateRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    messages: list[Message]
    tools: list[ToolDef] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None


class EmbeddingsRequest(msgspec.Struct, kw_only=True):
    # A string, a list of strings, a list of token ids, or a list of lists of token ids.
    input: Union[str, list[Any]]
    model: str | None = None
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None


MAX_EMBEDDING_INPUTS = 2048


def embedding_inputs(req: EmbeddingsRequest) -> tuple[tuple[str, ...], tuple[bytes, ...]]:
    """The inputs as texts, or as packed token-id arrays; 400s naming ``input``."""
    if req.encoding_format not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    if req.dimensions is not None:
        raise InvalidRequest("'dimensions' is not supported by this model (its vectors have a fixed size)",
                             param="dimensions")
    raw: Any = req.input
    if isinstance(raw, str):
        raw = [raw]
    if not raw:
        raise InvalidRequest("'input' must not be empty", param="input")
    if len(raw) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(f"at most {MAX_EMBEDDING_INPUTS} inputs per request", param="input")
    if all(isinstance(x, str) for x in raw):
        if any(not x for x in raw):
            raise InvalidRequest("'input' must not contain empty strings", param="input")
        return tuple(raw), ()
    if all(type(x) is int for x in raw):
        raw = [raw]  # one input given as token ids
    if all(isinstance(x, list) and x and all(type(t) is int and 0 <= t <= MAX_TOKEN_ID for t in x) for x in raw):
        return (), tuple(array.array("i", x).tobytes() for x in raw)
    raise InvalidRequest(
        "'input' must be a string, a list of strings, a list of token ids or a list of lists of token ids",
        param="input")
