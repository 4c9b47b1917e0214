"""OpenAI request types, parsed and validated once at the edge.

:func:`parse` turns a raw body into a typed request (400 naming the field on a wrong type or a
missing field); :func:`sampling_params` and :func:`chat_messages` check ranges (the reference
server's status codes: 400 or 422) and produce the engine-side records.
"""

from __future__ import annotations

import array
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union

import msgspec

from axserving.config import SamplingDefaults
from axserving.errors import InvalidRequest, UnprocessableRequest
from ipc.records import ChatMessage, SamplingParams

MAX_TOKENS_LIMIT = 32768
MAX_STOP_SEQUENCES = 16
_MODEL_ID = re.compile(r"^[A-Za-z0-9._-]+$")


class TextPart(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class ImagePart(msgspec.Struct, tag_field="type", tag="image_url"):
    image_url: Any = None


class Message(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[Union[TextPart, ImagePart]], None] = None
    name: str | None = None


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
    logprobs: Union[bool, int, None] = None
    top_logprobs: int | None = None
    ignore_eos: bool = False
    user: str | None = None
    priority: str | None = None  # critical, high, normal, low, background (else X-Priority)


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: list[Message]
    max_completion_tokens: int | None = None


class CompletionRequest(_Sampling, kw_only=True):
    # A string, or (OpenAI) a list of one string, a list of token ids, or a list of one such list.
    prompt: Union[str, list[Any]]
    echo: bool = False
    suffix: str | None = None


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
    if req.n != 1:
        raise InvalidRequest("only n=1 is supported", param="n")
    max_tokens = req.max_tokens
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        max_tokens = req.max_completion_tokens
    param = "max_tokens"
    if max_tokens is not None and not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise InvalidRequest(f"'{param}' must be between 1 and {MAX_TOKENS_LIMIT}, got {max_tokens}", param=param)
    _in_range("temperature", req.temperature, 0, 2)
    _in_range("top_p", req.top_p, 0, 1)
    _in_range("min_p", req.min_p, 0, 1)
    if req.top_k is not None and req.top_k < 1:
        raise UnprocessableRequest(f"'top_k' must be at least 1, got {req.top_k}", param="top_k")
    _in_range("repeat_penalty", req.repeat_penalty, 0, 10, lo_open=True)
    _in_range("frequency_penalty", req.frequency_penalty, -2, 2)
    _in_range("presence_penalty", req.presence_penalty, -2, 2)
    if req.top_logprobs is not None:
        if req.top_logprobs > 20 or req.top_logprobs < 0:
            raise UnprocessableRequest("'top_logprobs' must be between 0 and 20", param="top_logprobs")
        if not req.logprobs:
            raise UnprocessableRequest("'top_logprobs' requires 'logprobs' to be true", param="top_logprobs")
    if req.logprobs:
        raise InvalidRequest("'logprobs' is not supported yet", param="logprobs")
    stop: tuple[str, ...] = ()
    if isinstance(req.stop, str):
        stop = (req.stop,) if req.stop else ()
    elif req.stop:
        stop = tuple(s for s in req.stop if s)
    if len(stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed", param="stop")
    return RequestSampling(
        max_tokens=max_tokens,
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
                if not isinstance(part, TextPart):
                    raise InvalidRequest(
                        "only text content parts are supported by this model",
                        param=f"messages.{i}.content",
                    )
                parts.append(part.text)
            text = "".join(parts)
        out.append(ChatMessage(role=m.role, content=text, name=m.name))
    return tuple(out)


MAX_TOKEN_ID = (1 << 31) - 1


def completion_prompt(req: CompletionRequest) -> str | array.array[int]:
    """The prompt as text, or as token ids packed in an int32 array (sent to the engine as is)."""
    if req.echo:
        raise InvalidRequest("'echo' is not supported", param="echo")
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
