"""A test double for the engine boundary: echoes the prompt back, word by word.

Like the real backend it runs up to ``max_batch`` requests together (one word per request per
step) and queues the rest in order, so tests see real interleaving across the rings. Its output
goes through the shared output layer (:mod:`engine_proc.output`) with a word-level vocabulary,
so stop strings, ``n``, logprobs (made-up values) and tool-call parsing (echo a ``<tool_call>``)
behave as they do on a real model. It cannot constrain output: a grammar is refused.

Knobs, from ``BackendConfig.options`` (``--backend-option k=v``):

- ``delay_ms``: sleep this long in every step (default 2), to make streams observable;
- ``load_delay_ms``: sleep this long in :meth:`load`;
- ``fail_load``: ``1`` makes :meth:`load` raise;
- ``fail_load_while``: a path; :meth:`load` raises while it exists (a fault that clears).

Markers in the prompt text drive failures on demand:

- ``[[crash]]``: the engine process SIGKILLs itself in the step after the first token;
- ``[[error]]``: :meth:`step` raises (a fatal backend error).
"""

from __future__ import annotations

import array
import os
import signal
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import llguidance
import numpy as np

from engine_proc.backends.base import Backend, ModelInfo, RequestRejected
from engine_proc.grammar import GrammarError
from engine_proc.output import ChoiceOutput
from engine_proc.tokenizer import Tokenizer
from ipc.records import (
    Delta,
    FinishReason,
    Kind,
    Submit,
    TokenLogprob,
    TopLogprob,
    merge,
)

EOS = 0


class WordTokenizer(Tokenizer):
    """Words (with their trailing space) as tokens, numbered as they are first seen."""

    template = "{{ messages }}"  # a template exists; render() below is what it does

    def __init__(self) -> None:
        self.n_vocab = 1 << 20
        self._ids: dict[str, int] = {"": EOS}
        self._words: list[str] = [""]

    def encode(self, text: str, special: bool) -> list[int]:
        out = []
        for word in text.split():
            word += " "
            if word not in self._ids:
                self._ids[word] = len(self._words)
                self._words.append(word)
            out.append(self._ids[word])
        return out

    def piece(self, token: int) -> bytes:
        return self.token_text(token).encode()

    def token_text(self, token: int) -> str:
        return self._words[token] if token < len(self._words) else f"t{token} "  # ids never seen

    def is_eog(self, token: int) -> bool:
        return token == EOS

    def render(self, messages: list[dict[str, Any]], extra: dict[str, Any]) -> str:
        return "\n".join(m["content"] for m in messages)

    def guidance(self) -> llguidance.LLTokenizer:
        raise GrammarError("the fake backend cannot constrain output (use a real model)")


@dataclass
class _Seq:
    rid: int
    words: list[int]
    outs: list[ChoiceOutput]
    crash: bool
    error: bool
    produced: int = 0
    done: set[int] = field(default_factory=set)


class FakeBackend(Backend):
    name = "fake"

    def load(self) -> ModelInfo:
        if self.config.option("fail_load") == "1":
            raise RuntimeError("fake backend told to fail loading")
        while_path = self.config.option("fail_load_while")
        if while_path and os.path.exists(while_path):
            raise RuntimeError(f"fake backend told to fail loading while {while_path} exists")
        time.sleep(float(self.config.option("load_delay_ms", "0")) / 1000)
        self.setup(float(self.config.option("delay_ms", "2")) / 1000)
        return ModelInfo(backend=self.name, n_ctx=self.config.n_ctx, description="echo test double", step_s=self.delay)

    def setup(self, delay: float, markers: bool = True) -> None:
        """Ready to take requests (``load`` without its knobs; the in-process client calls it).
        ``markers``: obey ``[[crash]]`` and ``[[error]]``."""
        self.delay = delay
        self.markers = markers
        self.tok = self.tokenizer = WordTokenizer()
        self._seqs: dict[int, _Seq] = {}  # running
        self._waiting: deque[_Seq] = deque()
        self._ready: list[Delta] = []  # embeddings, sent with the next step

    def submit(self, request: Submit) -> None:
        if (request.kind is Kind.embed) != self.config.embeddings:
            loaded = "embeddings" if self.config.embeddings else "generation"
            raise RequestRejected("invalid_request", f"this model is loaded for {loaded}", "model")
        if request.kind is Kind.embed:
            self._embed(request)
            return
        if request.messages is not None:
            user = [m.content for m in request.messages if m.role == "user"]
            source = user[-1] if user else request.messages[-1].content
            prompt_tokens = sum(len(m.content.split()) + 4 for m in request.messages)
        elif request.prompt_ids is not None:
            ids = array.array("i")
            ids.frombytes(request.prompt_ids)
            source = " ".join(f"t{t}" for t in ids)
            prompt_tokens = len(ids)
        else:
            source = request.prompt or ""
            prompt_tokens = len(source.split())
        if prompt_tokens >= self.config.n_ctx:
            raise RequestRejected(
                "context_length_exceeded",
                f"This model's maximum context length is {self.config.n_ctx} tokens. "
                f"However, your messages resulted in {prompt_tokens} tokens.",
                "messages" if request.messages is not None else "prompt",
            )
        if not 1 <= request.gen.n <= max(1, self.config.max_batch):
            raise RequestRejected("invalid_request", f"n must be between 1 and {self.config.max_batch}", "n")
        echo = source + " " if request.gen.echo else ""
        try:
            outs = [
                ChoiceOutput(request.rid, i, request.params, request.gen, self.tok, prompt_tokens, echo)
                for i in range(request.gen.n)
            ]
        except GrammarError as e:
            raise RequestRejected("invalid_request", str(e)) from e
        self._waiting.append(_Seq(
            request.rid,
            self.tok.encode(source, special=False) or self.tok.encode("(empty)", special=False),
            outs,
            crash=self.markers and "[[crash]]" in source,
            error=self.markers and "[[error]]" in source,
        ))

    def _embed(self, request: Submit) -> None:
        """Vectors made from the words' hashes: equal texts equal vectors, normalized."""
        counted = 0
        for i, text in enumerate(request.inputs or [f"ids{len(b)}" for b in request.inputs_ids]):
            vec = np.zeros(8, dtype=np.float32)
            for word in text.split() or ["(empty)"]:
                vec[zlib.crc32(word.encode()) % 8] += 1.0
            vec /= np.linalg.norm(vec)
            counted += len(text.split())
            self._ready.append(Delta(request.rid, finish_reason=FinishReason.stop, prompt_tokens=counted, index=i,
                                     embedding=vec.tobytes()))

    def step(self) -> list[Delta]:
        if self._ready:
            ready, self._ready = self._ready, []
            return ready
        while self._waiting and len(self._seqs) < max(1, self.config.max_batch):
            seq = self._waiting.popleft()
            self._seqs[seq.rid] = seq
        if self.delay:
            time.sleep(self.delay)
        deltas: list[Delta] = []
        for seq in [s for s in self._seqs.values() if self.cancelled(s.rid)]:
            del self._seqs[seq.rid]  # as the real backend drops a cancelled prefill
            self.dropped.append(seq.rid)
        for seq in list(self._seqs.values()):
            if seq.crash and seq.produced:
                os.kill(os.getpid(), signal.SIGKILL)
            if seq.error and seq.produced:
                raise RuntimeError("fake backend told to fail a step")
            token = seq.words[seq.produced]
            seq.produced += 1
            for out in seq.outs:
                if out.finish is not None:
                    continue
                lp = None
                if out.gen.logprobs >= 0:
                    raw = self.tok.piece(token)
                    alts = (TopLogprob(raw.decode(), -0.25, raw), TopLogprob("<alt> ", -1.5, b"<alt> "))
                    lp = TokenLogprob("", -0.25, raw, alts[: out.gen.logprobs])
                delta = out.accept(token, lp)
                if delta.finish_reason is None and seq.produced >= len(seq.words):
                    delta = merge(delta, out.end(FinishReason.stop))
                deltas.append(delta)
            if all(out.finish is not None for out in seq.outs):
                del self._seqs[seq.rid]
        return deltas

    def abort(self, rid: int) -> None:
        if self._seqs.pop(rid, None) is None:
            for seq in self._waiting:
                if seq.rid == rid:
                    self._waiting.remove(seq)
                    break

    def has_work(self) -> bool:
        return bool(self._seqs) or bool(self._waiting) or bool(self._ready)

    def occupancy(self) -> tuple[int, int]:
        return len(self._seqs), len(self._waiting)

    def kv_usage(self) -> float:
        held = sum((len(s.words) + s.produced) * len(s.outs) for s in self._seqs.values())
        return min(1.0, held / (self.config.n_ctx * max(1, self.config.max_batch)))
