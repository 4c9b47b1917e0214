"""A test double for the engine boundary: echoes the prompt back, word by word.

Like the real backend it runs up to ``max_batch`` requests together (one word per request per
step) and queues the rest in order, so tests see real interleaving across the rings. Knobs, from ``BackendConfig.options`` (``--backend-option k=v``):

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
from collections import deque
from dataclasses import dataclass

from engine_proc.backends.base import Backend, ModelInfo, RequestRejected
from engine_proc.backends.detok import DetokStream
from ipc.records import Delta, FinishReason, Submit


@dataclass
class _Seq:
    rid: int
    words: list[str]
    max_tokens: int
    prompt_tokens: int
    crash: bool
    error: bool
    text: DetokStream
    produced: int = 0


class FakeBackend(Backend):
    name = "fake"

    def load(self) -> ModelInfo:
        if self.config.option("fail_load") == "1":
            raise RuntimeError("fake backend told to fail loading")
        while_path = self.config.option("fail_load_while")
        if while_path and os.path.exists(while_path):
            raise RuntimeError(f"fake backend told to fail loading while {while_path} exists")
        time.sleep(float(self.config.option("load_delay_ms", "0")) / 1000)
        self._delay = float(self.config.option("delay_ms", "2")) / 1000
        self._seqs: dict[int, _Seq] = {}  # running
        self._waiting: deque[_Seq] = deque()
        return ModelInfo(backend=self.name, n_ctx=self.config.n_ctx, description="echo test double", step_s=self._delay)

    def submit(self, request: Submit) -> None:
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
            )
        words = [w + " " for w in source.split()] or ["(empty) "]
        self._waiting.append(_Seq(
            request.rid,
            words,
            request.params.max_tokens,
            prompt_tokens,
            crash="[[crash]]" in source,
            error="[[error]]" in source,
            text=DetokStream(request.params.stop),
        ))

    def step(self) -> list[Delta]:
        while self._waiting and len(self._seqs) < max(1, self.config.max_batch):
            seq = self._waiting.popleft()
            self._seqs[seq.rid] = seq
        if self._delay:
            time.sleep(self._delay)
        deltas: list[Delta] = []
        for seq in [s for s in self._seqs.values() if self.cancelled(s.rid)]:
            del self._seqs[seq.rid]  # as the real backend drops a cancelled prefill
            self.dropped.append(seq.rid)
        for seq in list(self._seqs.values()):
            if seq.crash and seq.produced:
                os.kill(os.getpid(), signal.SIGKILL)
            if seq.error and seq.produced:
                raise RuntimeError("fake backend told to fail a step")
            word = seq.words[seq.produced]
            seq.produced += 1
            n = seq.produced
            finish: FinishReason | None = None
            chunk = seq.text.feed(word.encode())
            text = chunk.text
            if chunk.stopped:
                finish = "stop"
            elif n >= seq.max_tokens:
                finish, text = "length", text + seq.text.flush()
            elif n >= len(seq.words):
                finish, text = "stop", text + seq.text.flush()
            deltas.append(Delta(seq.rid, text, 1, finish, seq.prompt_tokens, n))
            if finish is not None:
                del self._seqs[seq.rid]
        return deltas

    def abort(self, rid: int) -> None:
        if self._seqs.pop(rid, None) is None:
            for seq in self._waiting:
                if seq.rid == rid:
                    self._waiting.remove(seq)
                    break

    def has_work(self) -> bool:
        return bool(self._seqs) or bool(self._waiting)

    def occupancy(self) -> tuple[int, int]:
        return len(self._seqs), len(self._waiting)
