"""OpenAI response shapes for chat and text completions, streaming and not."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson


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
class Shape:
    """How one endpoint names and nests its output. Subclassed per endpoint."""

    id_prefix: ClassVar[str] = "x"
    chunk_object: ClassVar[str] = ""

    model: str
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{self.id_prefix}-{uuid.uuid4().hex}"

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def _with_usage_field(self, body: dict[str, Any]) -> dict[str, Any]:
        # OpenAI: with include_usage, every chunk carries "usage": null until the final one.
        if self.include_usage:
            body["usage"] = None
        return body

    def sse(self, payload: dict[str, Any]) -> str:
        return orjson.dumps(payload).decode()

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> str:
        body = self._envelope(self.chunk_object, [])
        body["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
        return self.sse(body)


class ChatShape(Shape):
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def first_chunk(self) -> str:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return self.sse(self._with_usage_field(self._envelope(self.chunk_object, [choice])))

    def chunk(self, text: str, finish_reason: str | None) -> str:
        delta = {"content": text} if text else {}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self.sse(self._with_usage_field(self._envelope(self.chunk_object, [choice])))

    def complete(
        self, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        body = self._envelope("chat.completion", [choice])
        body["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
        return body


class CompletionShape(Shape):
    id_prefix = "cmpl"
    chunk_object = "text_completion"

    def first_chunk(self) -> str | None:
        return None

    def chunk(self, text: str, finish_reason: str | None) -> str:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self.sse(self._with_usage_field(self._envelope(self.chunk_object, [choice])))

    def complete(
        self, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        body = self._envelope("text_completion", [choice])
        body["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
        return body
