"""llama.cpp's vocabulary and chat template behind the :class:`~engine_proc.tokenizer.Tokenizer`
seam, and what both llama.cpp backends (generation, embeddings) share."""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp
import llguidance
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from engine_proc.tokenizer import Tokenizer

_NO_TOKEN = -1  # llama.cpp's LLAMA_TOKEN_NULL: the vocab has no such special token


class LlamaTokenizer(Tokenizer):
    def __init__(self, llama: llama_cpp.Llama) -> None:
        self._llama = llama
        self._vocab = llama_cpp.llama_model_get_vocab(llama.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        bos = llama_cpp.llama_vocab_bos(self._vocab)
        self.bos = None if bos == _NO_TOKEN else bos
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self._buf = ctypes.create_string_buffer(64)
        self._guidance: llguidance.LLTokenizer | None = None
        self.template = llama.metadata.get("tokenizer.chat_template") or None
        self._chat: Jinja2ChatFormatter | None = None
        if self.template:
            eos = llama_cpp.llama_vocab_eos(self._vocab)
            self._chat = Jinja2ChatFormatter(
                template=self.template,
                eos_token=self.token_text(eos),
                bos_token=self.token_text(bos),
                add_generation_prompt=True,
            )

    @property
    def vocab(self) -> llama_cpp.llama_vocab_p:
        return self._vocab

    def encode(self, text: str, special: bool) -> list[int]:
        if not text:
            return []
        return self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def piece(self, token: int) -> bytes:
        buf = self._buf
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:  # the buffer is too small; -n is the size needed
            buf = self._buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def token_text(self, token: int) -> str:
        if token == _NO_TOKEN:
            return ""
        text: bytes = llama_cpp.llama_vocab_get_text(self._vocab, token)
        return text.decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def render(self, messages: list[dict[str, Any]], extra: dict[str, Any]) -> str:
        assert self._chat is not None
        return self._chat(messages=messages, **extra).prompt  # type: ignore[arg-type]

    def guidance(self) -> llguidance.LLTokenizer:
        if self._guidance is None:
            from llguidance.llamacpp import lltokenizer_from_vocab

            self._guidance = lltokenizer_from_vocab(self._vocab)
        return self._guidance


def install_heartbeat(ctx: llama_cpp.llama_context_p | None, callback: int, address: int) -> object:
    """Make ggml call ``callback(address)`` between the nodes of every graph it computes, so the
    heartbeat keeps beating through a long decode and stops if a kernel hangs. Returns the ctypes
    callback object, which must be kept alive while it is installed."""
    beat = llama_cpp.ggml_abort_callback(callback)
    llama_cpp.llama_set_abort_callback(ctx, beat, ctypes.c_void_p(address))
    return beat


def open_model(path: str) -> llama_cpp.Llama:
    """The model, its vocabulary and metadata. Its own context is kept tiny: each backend
    computes in a context of its own (generation with max_batch sequences, or embeddings)."""
    return llama_cpp.Llama(model_path=path, n_ctx=256, n_batch=8, n_ubatch=8, n_threads=1, verbose=False)


def release(batch: llama_cpp.llama_batch | None, ctx: llama_cpp.llama_context_p | None,
            llama: llama_cpp.Llama | None) -> None:
    """Free what a backend holds, in order: the batch, its context, then the model."""
    if batch is not None:
        llama_cpp.llama_batch_free(batch)
    if ctx is not None:
        llama_cpp.llama_free(ctx)
    if llama is not None:
        llama.close()
