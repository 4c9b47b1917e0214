"""The llama.cpp backend (llama-cpp-python bindings).

The high-level ``llama_cpp.Llama`` object loads the model, tokenizes, and gives us the GGUF
metadata (chat template); generation runs on the low-level API instead of ``Llama.generate``:
prompts go through ``llama_decode`` in ``n_batch`` chunks with an explicit sequence id, and each
token is drawn by llama.cpp's native sampler chain (:mod:`.llama_sampling`), so no logits are
copied into Python. Text comes out through :mod:`.detok` (UTF-8 reassembly, stop strings).

One sequence runs at a time; later requests wait in FIFO order. Per-sequence state lives in
:class:`_Sequence` so that a later version can put several sequences in one ``llama_decode``.
"""

from __future__ import annotations

import array
import ctypes
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from engine_proc.backends.base import Backend, BackendConfig, ModelInfo, RequestRejected
from engine_proc.backends.detok import DetokStream
from engine_proc.backends.llama_sampling import SamplerChain
from ipc.records import ChatMessage, Delta, FinishReason, SamplingParams, Submit

_NO_TOKEN = -1  # llama.cpp's LLAMA_TOKEN_NULL: the vocab has no such special token


class _Cancelled(Exception):
    """The front cancelled the sequence while its prompt was being prefilled."""


class LlamaDecodeError(RuntimeError):
    """``llama_decode`` failed; the KV cache state of the sequence is no longer trustworthy."""


@dataclass(slots=True)
class _Waiting:
    rid: int
    params: SamplingParams
    prompt: list[int]


class _Sequence:
    """A running request: its KV-cache sequence id, tokens so far, sampler and text stream."""

    __slots__ = ("n_past", "n_prompt", "params", "rid", "sampler", "seq_id", "stream", "tokens")

    def __init__(self, waiting: _Waiting, seq_id: int, sampler: SamplerChain) -> None:
        self.rid = waiting.rid
        self.seq_id = seq_id
        self.params = waiting.params
        self.tokens: list[int] = list(waiting.prompt)  # prompt + generated
        self.n_prompt = len(waiting.prompt)
        self.n_past = 0  # tokens already in the KV cache
        self.sampler = sampler
        self.stream = DetokStream(waiting.params.stop)

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.n_prompt


class LlamaCppBackend(Backend):
    name = "llama_cpp"

    def __init__(self, config: BackendConfig) -> None:
        super().__init__(config)
        self._llama: llama_cpp.Llama | None = None
        self._ctx: llama_cpp.llama_context_p | None = None
        self._vocab: llama_cpp.llama_vocab_p | None = None
        self._memory: llama_cpp.llama_memory_t | None = None
        self._batch: llama_cpp.llama_batch | None = None
        self._n_ctx = 0
        self._n_batch = 0
        self._n_vocab = 0
        self._bos = _NO_TOKEN
        self._add_bos = False
        self._chat: Jinja2ChatFormatter | None = None
        self._piece_buf = ctypes.create_string_buffer(64)
        self._waiting: deque[_Waiting] = deque()
        self._running: _Sequence | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    def load(self) -> ModelInfo:
        cfg = self.config
        n_threads = cfg.n_threads or os.cpu_count() or 1
        llama = llama_cpp.Llama(
            model_path=cfg.model_path,
            n_ctx=cfg.n_ctx,
            n_batch=cfg.n_batch,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            verbose=False,
        )
        self._llama = llama
        self._ctx = llama.ctx
        self._vocab = llama_cpp.llama_model_get_vocab(llama.model)
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        if self._memory is None:
            raise RuntimeError(f"{cfg.model_path}: the context has no KV memory (not a decoder?)")
        llama_cpp.llama_memory_clear(self._memory, True)
        # Per-sequence context: what one request may use (equals n_ctx with one sequence).
        self._n_ctx = llama_cpp.llama_n_ctx_seq(self._ctx)
        self._n_batch = llama_cpp.llama_n_batch(self._ctx)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._bos = llama_cpp.llama_vocab_bos(self._vocab)
        self._add_bos = llama_cpp.llama_vocab_get_add_bos(self._vocab)
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._chat = self._chat_formatter(llama.metadata)

        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(llama.model, desc, len(desc))
        name = llama.metadata.get("general.name", "")
        description = f"{name} ({desc.value.decode()})" if name else desc.value.decode()
        return ModelInfo(backend=self.name, n_ctx=self._n_ctx, description=description)

    def _chat_formatter(self, metadata: dict[str, str]) -> Jinja2ChatFormatter | None:
        template = metadata.get("tokenizer.chat_template")
        if not template:
            return None
        eos = llama_cpp.llama_vocab_eos(self._vocab)
        return Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(eos),
            bos_token=self._token_text(self._bos),
            add_generation_prompt=True,
        )

    def close(self) -> None:
        if self._running is not None:
            self._end(self._running)
        self._waiting.clear()
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._llama is not None:
            self._llama.close()
            self._llama = None
        self._ctx = self._vocab = self._memory = None

    # ---- requests ----------------------------------------------------------------------------

    def submit(self, request: Submit) -> None:
        if request.params.max_tokens < 1:
            raise RequestRejected("invalid_request", "max_tokens must be at least 1")
        if request.messages is not None:
            prompt, what = self._chat_tokens(request.messages), "messages"
        elif request.prompt is not None:
            prompt, what = self._completion_tokens(request.prompt), "prompt"
        elif request.prompt_ids is not None:
            prompt, what = self._token_ids(request.prompt_ids), "prompt"
        else:
            raise RequestRejected("invalid_request", "request has neither messages nor prompt")
        if len(prompt) >= self._n_ctx:
            raise RequestRejected(
                "context_length_exceeded",
                f"This model's maximum context length is {self._n_ctx} tokens. However, your "
                f"{what} resulted in {len(prompt)} tokens. Please reduce the length of the {what}.",
            )
        self._waiting.append(_Waiting(request.rid, request.params, prompt))

    def _chat_tokens(self, messages: Sequence[ChatMessage]) -> list[int]:
        if self._chat is None:
            raise RequestRejected(
                "invalid_request", "model has no chat template; use /v1/completions"
            )
        rendered = [
            {"role": m.role, "content": m.content} | ({"name": m.name} if m.name else {})
            for m in messages
        ]
        try:
            text = self._chat(messages=rendered).prompt  # type: ignore[arg-type]
        except Exception as e:  # jinja2 errors and the template's own raise_exception
            raise RequestRejected("invalid_request", f"chat template failed: {e}") from e
        tokens = self._tokenize(text, add_bos=False)
        # Most templates that want a BOS write it themselves; add one only if it is missing.
        if self._add_bos and self._bos != _NO_TOKEN and tokens[:1] != [self._bos]:
            tokens.insert(0, self._bos)
        return tokens

    def _token_ids(self, packed: bytes) -> list[int]:
        ids = array.array("i")
        ids.frombytes(packed)
        bad = next((t for t in ids if not 0 <= t < self._n_vocab), None)
        if bad is not None:
            raise RequestRejected(
                "invalid_request", f"token id {bad} is outside the model's vocabulary (size {self._n_vocab})"
            )
        return ids.tolist()

    def _completion_tokens(self, prompt: str) -> list[int]:
        tokens = self._tokenize(prompt, add_bos=True)  # llama.cpp adds BOS iff the model wants
        if not tokens and self._bos != _NO_TOKEN:
            tokens = [self._bos]  # an empty prompt: start from BOS as llama-cpp-python does
        if not tokens:
            raise RequestRejected("invalid_request", "prompt is empty")
        return tokens

    def _tokenize(self, text: str, add_bos: bool) -> list[int]:
        assert self._llama is not None, "load() first"
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def abort(self, rid: int) -> None:
        if self._running is not None and self._running.rid == rid:
            self._end(self._running)
            return
        for w in self._waiting:
            if w.rid == rid:
                self._waiting.remove(w)
                return

    def has_work(self) -> bool:
        return self._running is not None or bool(self._waiting)

    def occupancy(self) -> tuple[int, int]:
        return (1 if self._running is not None else 0), len(self._waiting)

    # ---- generation --------------------------------------------------------------------------

    def step(self) -> list[Delta]:
        if self._ctx is None:
            raise RuntimeError("LlamaCppBackend.step() before load() or after close()")
        seq = self._running
        if seq is None:
            if not self._waiting:
                return []
            seq = self._start(self._waiting.popleft())
        try:
            # A new sequence: prefill its prompt. Otherwise feed back the last sampled token.
            out = self._decode(seq, seq.tokens[seq.n_past :])
            token = seq.sampler.sample(self._ctx, out)
        except _Cancelled:
            self._end(seq)  # its KV is freed now; the Abort record that follows is a no-op
            return []
        except BaseException:
            self._end(seq)
            raise
        delta = self._advance(seq, token)
        if delta.finish_reason is not None:
            self._end(seq)
        return [delta]

    def _start(self, waiting: _Waiting) -> _Sequence:
        seq_id = 0  # one sequence at a time for now
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        seq = _Sequence(waiting, seq_id, SamplerChain(waiting.params, self._n_vocab))
        self._running = seq
        return seq

    def _end(self, seq: _Sequence) -> None:
        seq.sampler.free()
        if self._memory is not None:
            llama_cpp.llama_memory_seq_rm(self._memory, seq.seq_id, -1, -1)
        if self._running is seq:
            self._running = None

    def _decode(self, seq: _Sequence, tokens: list[int]) -> int:
        """Put ``tokens`` into the KV cache in ``n_batch`` chunks, one ``llama_decode`` each.

        Only the last token asks for logits. Returns its index in the last batch, which is what
        ``llama_sampler_sample`` wants.
        """
        batch = self._batch
        assert batch is not None and tokens
        for start in range(0, len(tokens), self._n_batch):
            if start and self.cancelled(seq.rid):
                raise _Cancelled()
            chunk = tokens[start : start + self._n_batch]
            last_chunk = start + len(chunk) == len(tokens)
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                # llama_cpp types ``pos`` as an array of arrays; it is a flat int32 array.
                batch.pos[i] = seq.n_past + i  # type: ignore[call-overload]
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq.seq_id
                batch.logits[i] = 0
            if last_chunk:
                batch.logits[len(chunk) - 1] = 1
            batch.n_tokens = len(chunk)
            rc = llama_cpp.llama_decode(self._ctx, batch)
            if rc != 0:
                raise LlamaDecodeError(f"llama_decode returned {rc} (request {seq.rid})")
            seq.n_past += len(chunk)
            self.heartbeat()
        return batch.n_tokens - 1

    def _advance(self, seq: _Sequence, token: int) -> Delta:
        """Record a sampled token and turn it into this step's delta."""
        seq.tokens.append(token)
        params = seq.params
        finish: FinishReason | None = None
        if not params.ignore_eos and llama_cpp.llama_vocab_is_eog(self._vocab, token):
            text, finish = seq.stream.flush(), "stop"
        else:
            chunk = seq.stream.feed(self._piece(token))
            text = chunk.text
            if chunk.stopped:
                finish = "stop"
            elif seq.n_generated >= params.max_tokens or len(seq.tokens) >= self._n_ctx:
                text, finish = text + seq.stream.flush(), "length"
        return Delta(
            rid=seq.rid,
            text=text,
            n_tokens=1,
            finish_reason=finish,
            prompt_tokens=seq.n_prompt,
            completion_tokens=seq.n_generated,
        )

    # ---- vocab helpers -----------------------------------------------------------------------

    def _piece(self, token: int) -> bytes:
        """The token's bytes; control tokens (end-of-turn, ...) render as nothing."""
        buf = self._piece_buf
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:  # the buffer is too small; -n is the size needed
            buf = self._piece_buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def _token_text(self, token: int) -> str:
        if token == _NO_TOKEN:
            return ""
        text: bytes = llama_cpp.llama_vocab_get_text(self._vocab, token)
        return text.decode("utf-8", "replace")
