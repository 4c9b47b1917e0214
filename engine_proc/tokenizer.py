"""The tokenizer seam: what the shared prompt and output layers need from a model's vocabulary.

A backend implements the few primitives (encode, a token's bytes, end-of-generation, the chat
template, the llguidance tokenizer); :meth:`Tokenizer.chat_tokens` turns messages into prompt
tokens the same way for every backend:

- each message's text goes through the template as a placeholder, and is tokenized as text, so
  only the template's own structure produces special tokens (otherwise ``<|im_start|>system``
  typed by a user becomes a real turn). ``trusted`` turns this off for trusted deployments;
- tools are rendered through the template when it supports them, else described in a system
  message (:mod:`engine_proc.tools`).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import llguidance

from engine_proc.tools import MARKER_TEXTS, ToolFormat, detect, template_messages
from ipc.records import ChatMessage, Generation, ToolChoice

# A message's place in the rendered template: private-use characters no template changes.
_PLACEHOLDER = re.compile("\ue000([0-9]+)\ue001")


class TemplateError(ValueError):
    """The chat template could not render these messages (its own raise_exception, jinja errors)."""


class Tokenizer(abc.ABC):
    n_vocab: int
    bos: int | None = None  # None: the vocabulary has none
    add_bos: bool = False  # the model wants a BOS at the start of a prompt
    template: str | None = None  # the chat template (jinja), None if the model has none

    @abc.abstractmethod
    def encode(self, text: str, special: bool) -> list[int]:
        """``special``: special-token markup in ``text`` becomes those tokens."""

    @abc.abstractmethod
    def piece(self, token: int) -> bytes:
        """The token's bytes as output text; control tokens (end of turn, ...) are empty."""

    @abc.abstractmethod
    def token_text(self, token: int) -> str:
        """The token as the vocabulary spells it, control tokens included."""

    @abc.abstractmethod
    def is_eog(self, token: int) -> bool:
        """The token ends generation (EOS, end of turn)."""

    @abc.abstractmethod
    def render(self, messages: list[dict[str, Any]], extra: dict[str, Any]) -> str:
        """Apply the chat template (with the generation prompt); raise TemplateError."""

    @abc.abstractmethod
    def guidance(self) -> llguidance.LLTokenizer:
        """The vocabulary for llguidance (built once, on first use: it takes about 0.3 s)."""

    # ---- shared ------------------------------------------------------------------------------

    @cached_property
    def tool_format(self) -> ToolFormat:
        return detect(self.template)

    @cached_property
    def markers(self) -> dict[int, str]:
        """Control tokens that spell a tool-call marker: the tool parser must see their text."""
        found: dict[int, str] = {}
        for text in MARKER_TEXTS:
            ids = self.encode(text, special=True)
            if len(ids) == 1 and not self.piece(ids[0]):
                found[ids[0]] = text
        return found

    def chat_text(self, messages: Sequence[ChatMessage], gen: Generation) -> str:
        """The chat template applied, as text (what /apply-template shows)."""
        if self.template is None:
            raise TemplateError("model has no chat template")
        tools = gen.tools if gen.tool_choice is not ToolChoice.none else ()
        rendered, extra = template_messages(messages, self.tool_format, tools, lambda text: text)
        try:
            return self.render(rendered, extra)
        except Exception as e:
            raise TemplateError(f"chat template failed: {e}") from e

    def chat_tokens(self, messages: Sequence[ChatMessage], gen: Generation, trusted: bool = False) -> list[int]:
        if self.template is None:
            raise TemplateError("model has no chat template; use /v1/completions")
        texts: list[str] = []

        def content(text: str) -> str:
            if trusted:
                return text
            texts.append(text)
            return f"\ue000{len(texts) - 1}\ue001"

        tools = gen.tools if gen.tool_choice is not ToolChoice.none else ()
        rendered, extra = template_messages(messages, self.tool_format, tools, content)
        try:
            prompt = self.render(rendered, extra)
        except TemplateError:
            raise
        except Exception as e:  # jinja2 errors and the template's own raise_exception
            raise TemplateError(f"chat template failed: {e}") from e
        if trusted:
            tokens = self.encode(prompt, special=True)
        else:
            tokens = []
            for j, part in enumerate(_PLACEHOLDER.split(prompt)):
                if j % 2 == 0:  # the template's text
                    tokens += self.encode(part, special=True) if part else []
                elif texts[int(part)]:  # a message's text: no special tokens
                    tokens += self.encode(texts[int(part)], special=False)
        # Most templates that want a BOS write it themselves; add one only if it is missing.
        if self.add_bos and self.bos is not None and tokens[:1] != [self.bos]:
            tokens.insert(0, self.bos)
        return tokens

    def completion_tokens(self, prompt: str) -> list[int]:
        tokens = self.encode(prompt, special=True)
        if self.add_bos and self.bos is not None and tokens[:1] != [self.bos]:
            tokens.insert(0, self.bos)
        if not tokens and self.bos is not None:
            tokens = [self.bos]  # an empty prompt: start from BOS as llama-cpp-python does
        return tokens

    def longest_piece(self) -> int:
        """Bytes of the vocabulary's longest token (one pass over the vocabulary)."""
        return max((len(self.piece(t)) for t in range(self.n_vocab)), default=1) or 1

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")
