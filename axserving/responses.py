"""OpenAI response shapes for chat and text completions, streaming and not.

A shape renders :class:`~axserving.engine.stream.Chunk` s (one choice's new output each) as
streamed chunks, and :class:`Choice` s (a choice's whole output) as a finished body. Choices are
indexed; logprobs take chat's ``content[]`` shape or completions' legacy one; tool calls are
streamed as OpenAI streams them: a first delta with the call's index, id, type and name, then
the arguments.
"""

from __future__ import annotations

import array
import time
import uuid
from base64 import b64encode
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import orjson

from axserving.engine.stream import Chunk
from axserving.errors import APIError
from axserving.sse import Event
from ipc.records import TokenLogprob, ToolCall


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        # OpenAI's field for prompt tokens served from a cache (here: KV reused from an
        # earlier request sharing the prefix).
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass
class Choice:
    """One choice's whole output, collected for a non-streaming response."""

    index: int
    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    token_ids: bytes = b""
    pieces: tuple[bytes, ...] = ()
    stop_sequence: str = ""
    embedding: bytes = b""

    def add(self, chunk: Chunk) -> None:
        self.parts.append(chunk.text)
        self.logprobs += chunk.logprobs
        self.tool_calls += chunk.tool_calls
        self.token_ids += chunk.token_ids
        self.pieces += chunk.pieces
        self.embedding = chunk.embedding or self.embedding
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
            self.stop_sequence = chunk.stop_sequence

    @property
    def text(self) -> str:
        return "".join(self.parts)


def _top(lp: TokenLogprob) -> list[dict[str, Any]]:
    return [{"token": t.token, "logprob": t.logprob, "bytes": list(t.raw)} for t in lp.top]


def chat_logprobs(lps: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.raw), "top_logprobs": _top(lp)} for lp in lps
        ],
        "refusal": None,
    }


def completion_logprobs(lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy shape: parallel lists, ``text_offset`` counted from ``offset``."""
    offsets, at = [], offset
    for lp in lps:
        offsets.append(at)
        at += len(lp.token)
    return {
        "tokens": [lp.token for lp in lps],
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def tool_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


@dataclass
class Shape:
    """How one endpoint names and nests its output. Subclassed per endpoint."""

    id_prefix: ClassVar[str] = "x"
    chunk_object: ClassVar[str] = ""
    object: ClassVar[str] = ""

    model: str
    include_usage: bool = False
    logprobs: bool = False
    n: int = 1
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{self.id_prefix}-{uuid.uuid4().hex}"

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def _streamed(self, choice: dict[str, Any]) -> str:
        body = self._envelope(self.chunk_object, [choice])
        # OpenAI: with include_usage, every chunk carries "usage": null until the final one.
        if self.include_usage:
            body["usage"] = None
        return self.sse(body)

    def sse(self, payload: dict[str, Any]) -> str:
        return orjson.dumps(payload).decode()

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> str:
        body = self._envelope(self.chunk_object, [])
        body["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
        return self.sse(body)

    def first_chunks(self, first: Chunk | None) -> list[Event]:
        return []

    def chunks(self, chunk: Chunk) -> list[Event]:
        raise NotImplementedError

    def final_events(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> list[Event]:
        """After the last chunk: OpenAI's usage chunk (with include_usage), then [DONE]."""
        usage_events: list[Event] = []
        if self.include_usage:
            usage_events.append(self.usage_chunk(prompt_tokens, completion_tokens, cached_tokens))
        return [*usage_events, "[DONE]"]

    def error_events(self, err: APIError) -> list[Event]:
        """A failure mid-stream: the error object as a final chunk, then [DONE]."""
        return [self.sse(err.body()), "[DONE]"]

    def _choice(self, choice: Choice) -> dict[str, Any]:
        raise NotImplementedError

    def complete(
        self, choices: list[Choice], prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> dict[str, Any]:
        body = self._envelope(self.object, [self._choice(c) for c in sorted(choices, key=lambda c: c.index)])
        body["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
        return body


class ChatShape(Shape):
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"
    object = "chat.completion"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._calls: dict[int, int] = {}  # choice -> tool calls streamed so far

    def first_chunks(self, first: Chunk | None) -> list[Event]:
        return [
            self._streamed({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
            for i in range(self.n)
        ]

    def chunks(self, chunk: Chunk) -> list[Event]:
        out: list[Event] = []
        i = chunk.index
        lps = chat_logprobs(chunk.logprobs) if self.logprobs and chunk.logprobs else None
        if chunk.text or lps is not None:
            out.append(self._streamed({"index": i, "delta": {"content": chunk.text}, "logprobs": lps, "finish_reason": None}))
        for call in chunk.tool_calls:
            k = self._calls.get(i, 0)
            self._calls[i] = k + 1
            head = {"index": k, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
            args = {"index": k, "function": {"arguments": call.arguments}}
            for piece in (head, args):
                out.append(self._streamed({"index": i, "delta": {"tool_calls": [piece]}, "logprobs": None, "finish_reason": None}))
        if chunk.finish_reason:
            out.append(self._streamed({"index": i, "delta": {}, "logprobs": None, "finish_reason": chunk.finish_reason}))
        return out

    def _choice(self, choice: Choice) -> dict[str, Any]:
        text = choice.text
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not choice.tool_calls else None}
        if choice.tool_calls:
            message["tool_calls"] = [tool_call(c) for c in choice.tool_calls]
        return {
            "index": choice.index,
            "message": message,
            "logprobs": chat_logprobs(choice.logprobs) if self.logprobs else None,
            "finish_reason": choice.finish_reason,
        }


class CompletionShape(Shape):
    id_prefix = "cmpl"
    chunk_object = "text_completion"
    object = "text_completion"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._offsets: dict[int, int] = {}  # choice -> characters streamed so far

    def chunks(self, chunk: Chunk) -> list[Event]:
        at = self._offsets.get(chunk.index, 0)
        self._offsets[chunk.index] = at + len(chunk.text)
        lps = completion_logprobs(chunk.logprobs, at) if self.logprobs else None
        choice = {"index": chunk.index, "text": chunk.text, "logprobs": lps, "finish_reason": chunk.finish_reason}
        return [self._streamed(choice)]

    def _choice(self, choice: Choice) -> dict[str, Any]:
        return {
            "index": choice.index,
            "text": choice.text,
            "logprobs": completion_logprobs(choice.logprobs, 0) if self.logprobs else None,
            "finish_reason": choice.finish_reason,
        }


def _ids(packed: bytes) -> list[int]:
    ids = array.array("i")
    ids.frombytes(packed)
    return ids.tolist()


@dataclass
class TokenizeShape(Shape):
    """llama-server's /tokenize: ``{"tokens": [ids]}``, or with pieces ``[{"id", "piece"}]`` (a
    piece that is not UTF-8 on its own is its list of bytes)."""

    with_pieces: bool = False

    def complete(
        self, choices: list[Choice], prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> dict[str, Any]:
        ids = _ids(choices[0].token_ids)
        if not self.with_pieces:
            return {"tokens": ids}
        return {"tokens": [{"id": t, "piece": _piece(p)} for t, p in zip(ids, choices[0].pieces, strict=True)]}


def _piece(raw: bytes) -> str | list[int]:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return list(raw)


class DetokenizeShape(Shape):
    def complete(
        self, choices: list[Choice], prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> dict[str, Any]:
        return {"content": choices[0].text}


class TemplateShape(Shape):
    def complete(
        self, choices: list[Choice], prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> dict[str, Any]:
        return {"prompt": choices[0].text}


@dataclass
class EmbeddingShape(Shape):
    """OpenAI's embeddings list. Vectors go from the engine's float32 bytes to JSON (orjson
    serializes the numpy view) or base64 without a Python float per element."""

    base64: bool = False

    def complete(
        self, choices: list[Choice], prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> dict[str, Any]:
        data = []
        for c in sorted(choices, key=lambda c: c.index):
            vector: Any = (b64encode(c.embedding).decode() if self.base64
                           else np.frombuffer(c.embedding, dtype=np.float32))
            data.append({"object": "embedding", "index": c.index, "embedding": vector})
        return {"object": "list", "data": data, "model": self.model,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
