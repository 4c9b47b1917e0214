"""A Hugging Face model directory's vocabulary and chat template (``tokenizer.json``,
``tokenizer_config.json``, ``config.json``) behind the :class:`~engine_proc.tokenizer.Tokenizer`
seam: what the MLX backend tokenizes with, through the Rust ``tokenizers`` library alone.

It is held to llama.cpp's vocabulary on the same model (the slow tier compares them token by
token): the same ids with and without special-token markup, the same bytes per token (control
tokens empty), the same end-of-generation set, the same rendered chat template (the same jinja
formatter renders both).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import llguidance
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from tokenizers import Tokenizer as RustTokenizer

from engine_proc.tokenizer import Tokenizer

# Spellings llama.cpp also counts as end of generation when a vocabulary has them: ends of
# turn, and the fill-in-the-middle pad and repository tokens (a model that writes one is done).
_EOG_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|endoftext|>", "<|end|>", "</s>",
              "<|return|>", "<|call|>", "<|end_of_text|>", "<EOT>",
              "<|fim_pad|>", "<fim-pad>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character standing for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class HFTokenizer(Tokenizer):
    def __init__(self, directory: Path) -> None:
        self._tok = RustTokenizer.from_file(str(directory / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.no_truncation()
        config_path = directory / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}
        model_config_path = directory / "config.json"
        model_config: dict[str, Any] = json.loads(model_config_path.read_text()) if model_config_path.is_file() else {}
        self.n_vocab = max(self._tok.get_vocab_size(with_added_tokens=True), int(model_config.get("vocab_size", 0)))
        self._special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        bos_text = config.get("bos_token")
        bos_text = bos_text.get("content") if isinstance(bos_text, dict) else bos_text
        self.bos = self._tok.token_to_id(bos_text) if bos_text else None
        self.add_bos = bool(config.get("add_bos_token", False)) and self.bos is not None
        eos_text = config.get("eos_token")
        eos_text = eos_text.get("content") if isinstance(eos_text, dict) else eos_text
        eos_ids = model_config.get("eos_token_id")
        eog = set(eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else [])
        for text in (eos_text, *_EOG_TEXTS):
            token = self._tok.token_to_id(text) if text else None
            if token is not None:
                eog.add(token)
        self._eog = frozenset(eog)
        self._eos = self._tok.token_to_id(eos_text) if eos_text else (min(eog) if eog else None)
        self._pieces = self._all_pieces()
        self._guidance: llguidance.LLTokenizer | None = None
        self.template = config.get("chat_template") or None
        self._chat: Jinja2ChatFormatter | None = None
        if self.template:
            self._chat = Jinja2ChatFormatter(
                template=self.template,
                eos_token=eos_text or "",
                bos_token=bos_text or "",
                add_generation_prompt=True,
            )

    def _all_pieces(self) -> list[bytes]:
        """Each token's output bytes, once: byte-level vocabularies map their alphabet back to
        bytes; sentencepiece ones turn ``▁`` into a space and ``<0xNN>`` into its byte."""
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
        byte_level = "ByteLevel" in kinds
        table = _byte_decoder()
        pieces = []
        for token in range(self.n_vocab):
            text = self._tok.id_to_token(token)
            if text is None or text in self._special:
                pieces.append(b"")
            elif byte_level:
                pieces.append(bytes(table[c] for c in text) if all(c in table for c in text) else text.encode())
            elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                pieces.append(bytes([int(text[3:5], 16)]))
            else:
                pieces.append(text.replace("\u2581", " ").encode())
        return pieces

    def encode(self, text: str, special: bool) -> list[int]:
        if not text:
            return []
        self._tok.encode_special_tokens = not special  # markup as text unless special
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def piece(self, token: int) -> bytes:
        return self._pieces[token] if 0 <= token < len(self._pieces) else b""

    def token_text(self, token: int) -> str:
        return self._tok.id_to_token(token) or ""

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    def render(self, messages: list[dict[str, Any]], extra: dict[str, Any]) -> str:
        assert self._chat is not None
        return self._chat(messages=messages, **extra).prompt  # type: ignore[arg-type]

    def guidance(self) -> llguidance.LLTokenizer:
        if self._guidance is None:
            self._guidance = llguidance.LLTokenizer(self._tok.to_str(), n_vocab=self.n_vocab, eos_token=self._eos)
        return self._guidance
