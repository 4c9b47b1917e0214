"""Typed records that cross the shared-memory rings.

Every record is a tagged ``msgspec.Struct`` encoded as MessagePack, never pickle: the tag makes
one decoder serve the whole union, ``array_like`` keeps records small, ``gc=False`` keeps them out
of the cycle collector on the hot path.

Front → engine: :class:`Submit`, :class:`Abort`, :class:`Shutdown`.
Engine → front: :class:`Ready`, :class:`Step`, :class:`Failed`, :class:`Fatal`.

A request is addressed by ``rid``, a small integer the front allocates per engine connection.
"""

from __future__ import annotations

import enum
from typing import Union

import msgspec

_STRUCT = dict(array_like=True, omit_defaults=True, gc=False, frozen=True)


class ToolCall(msgspec.Struct, **_STRUCT):
    """A complete function call: parsed from the output in the engine, or fed back in a chat."""

    id: str
    name: str
    arguments: str  # JSON text of an object


class ChatMessage(msgspec.Struct, **_STRUCT):
    role: str
    content: str
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant's earlier calls, fed back
    tool_call_id: str | None = None  # a tool result: the call it answers


class Tool(msgspec.Struct, **_STRUCT):
    name: str
    description: str = ""
    parameters: str = "{}"  # JSON Schema text


class ToolChoice(enum.StrEnum):
    none = "none"
    auto = "auto"
    required = "required"
    named = "named"  # exactly the tool named in ``Generation.tool_name``


class Generation(msgspec.Struct, **_STRUCT):
    """What a request asks of the output beyond sampling: choices, logprobs, constraints, tools."""

    n: int = 1
    logprobs: int = -1  # -1: none; 0: the chosen token's; k: and the top k alternatives
    logit_bias: tuple[tuple[int, float], ...] = ()
    grammar: str | None = None  # an llguidance grammar (validated by the front)
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice.auto
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    echo: bool = False  # completions: the prompt's text comes first in the output


class SamplingParams(msgspec.Struct, **_STRUCT):
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


# ---- front → engine -------------------------------------------------------------------------


class Kind(enum.StrEnum):
    """What a Submit asks for. Only ``generate`` runs the model; the others are answered at once
    from the vocabulary and template, in one delta (``token_ids``, ``pieces`` or ``text``)."""

    generate = "generate"
    tokenize = "tokenize"  # the prompt's tokens (chat: the template applied, with tools)
    detokenize = "detokenize"  # prompt_ids back to text
    template = "template"  # the chat template applied to the messages, as text
    embed = "embed"  # one pooled, L2-normalized vector per input (a model loaded for embeddings)

    @property
    def utility(self) -> bool:
        """Answered from the vocabulary and template, without the model."""
        return self in (Kind.tokenize, Kind.detokenize, Kind.template)


class Submit(msgspec.Struct, tag=1, **_STRUCT):
    """Start generating. Exactly one of ``messages`` (chat), ``prompt`` (completion text) or
    ``prompt_ids`` (completion token ids, packed native int32: one copy out of the ring,
    no Python int per token until the backend needs them) is set."""

    rid: int
    params: SamplingParams
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    prompt_ids: bytes | None = None
    gen: Generation = Generation()
    kind: Kind = Kind.generate
    inputs: tuple[str, ...] = ()  # embed: the texts
    inputs_ids: tuple[bytes, ...] = ()  # embed: inputs given as token ids (packed int32 each)
    request_id: str = ""  # the front's X-Request-ID, for the engine's log lines
    add_special: bool = False  # tokenize: a BOS as a completion prompt would start with
    with_pieces: bool = False  # tokenize: each token's bytes too


class Abort(msgspec.Struct, tag=2, **_STRUCT):
    rid: int


class Shutdown(msgspec.Struct, tag=3, **_STRUCT):
    pass


class Blob(msgspec.Struct, tag=4, **_STRUCT):
    """The real record is in blob segment ``name`` (it was too large for the ring)."""

    name: str
    nonce: int
    size: int


# ---- engine → front -------------------------------------------------------------------------

class FinishReason(enum.StrEnum):
    stop = "stop"  # end of turn, a stop string, or the grammar complete
    length = "length"  # max_tokens, or the context is full
    tool_calls = "tool_calls"  # the output was one or more tool calls


class TopLogprob(msgspec.Struct, **_STRUCT):
    token: str
    logprob: float
    raw: bytes  # the token's bytes (OpenAI's "bytes")


class TokenLogprob(msgspec.Struct, **_STRUCT):
    """One output token: its text as it appears in the output, its logprob, its alternatives."""

    token: str
    logprob: float
    raw: bytes  # the token's bytes (OpenAI's "bytes")
    top: tuple[TopLogprob, ...] = ()


class Delta(msgspec.Struct, **_STRUCT):
    """One choice's progress in one engine step."""

    rid: int
    text: str = ""
    n_tokens: int = 0  # tokens generated in this step
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0  # set on the first delta and the last one
    completion_tokens: int = 0  # running total
    cached_tokens: int = 0  # prompt tokens reused from the KV cache; set with prompt_tokens
    index: int = 0  # the choice (n > 1)
    token_ids: bytes = b""  # the tokens of ``text``, packed int32 (only with logprobs)
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token of ``text`` (when asked for)
    tool_calls: tuple[ToolCall, ...] = ()  # calls completed in this step
    pieces: tuple[bytes, ...] = ()  # Kind.tokenize with pieces: each token's bytes
    stop_sequence: str = ""  # with finish_reason stop: the stop string that matched, if one did
    embedding: bytes = b""  # Kind.embed: the input's vector, packed float32 (prompt_tokens: the
    # request's input tokens so far, so the last delta holds the total)


def merge(older: Delta, newer: Delta) -> Delta:
    """One delta saying what two consecutive deltas of the same choice said."""
    return Delta(
        older.rid,
        older.text + newer.text,
        older.n_tokens + newer.n_tokens,
        newer.finish_reason,
        newer.prompt_tokens or older.prompt_tokens,
        newer.completion_tokens,
        newer.cached_tokens or older.cached_tokens,
        newer.index,
        older.token_ids + newer.token_ids,
        older.logprobs + newer.logprobs,
        older.tool_calls + newer.tool_calls,
        older.pieces + newer.pieces,
        newer.stop_sequence or older.stop_sequence,
        newer.embedding or older.embedding,
    )


class Ready(msgspec.Struct, tag=10, **_STRUCT):
    pid: int
    backend: str
    n_ctx: int
    description: str = ""
    step_s: float = 0.0  # a full step's time, measured at load (0: unknown): sizes the hang watch


class Step(msgspec.Struct, tag=11, **_STRUCT):
    """Every running sequence's new output from one engine step."""

    deltas: tuple[Delta, ...]


class FailCode(enum.StrEnum):
    invalid_request = "invalid_request"  # 400
    context_length_exceeded = "context_length_exceeded"  # 400
    cancelled = "cancelled"  # the front cancelled it (the client left)
    engine_error = "engine_error"  # 500


class Failed(msgspec.Struct, tag=12, **_STRUCT):
    """One request failed in the engine; the engine itself carries on."""

    rid: int
    code: FailCode
    message: str
    param: str | None = None  # the request field at fault, in the API's notation


class Fatal(msgspec.Struct, tag=13, **_STRUCT):
    """The engine cannot go on (e.g. the model failed to load); it exits after sending this."""

    message: str


class Stats(msgspec.Struct, tag=14, **_STRUCT):
    """The engine's counters, about once a second while it runs."""

    running: int  # sequences being generated
    waiting: int  # accepted, not started
    steps: int  # backend steps since start
    tokens: int  # tokens generated since start
    merged_steps: int  # steps whose deltas waited for room in a full event ring
    preemptions: int = 0  # sequences preempted (KV cache full) and recomputed later
    max_step_s: float = 0.0  # the slowest step since the last Stats
    prefill_tokens: int = 0  # prompt tokens computed since start (reused ones are not)
    kv_usage: float = 0.0  # fraction of the KV cells held by running sequences (0..1)
    rss_bytes: int = 0  # the engine process's resident memory
    drafted_tokens: int = 0  # prompt-lookup drafted tokens fed since start
    kept_tokens: int = 0  # of them, those kept (drawn as drafted)


ToEngine = Union[Submit, Abort, Shutdown, Blob]
ToFront = Union[Ready, Step, Failed, Fatal, Stats, Blob]

_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode
to_engine_decoder = msgspec.msgpack.Decoder(ToEngine)
to_front_decoder = msgspec.msgpack.Decoder(ToFront)
