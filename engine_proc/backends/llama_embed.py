"""The llama.cpp backend loaded for embeddings: pooled, L2-normalized vectors, many inputs per
``llama_decode``.

The context is created with ``embeddings`` on and a pooling type (the model's own when its GGUF
says one, else mean; ``pooling`` in the model's config overrides it), one unified KV pool, and a
batch as large as the context, so that each input is computed whole. Every step clears the cache
and packs as many waiting inputs as fit (``max_batch`` sequences, ``n_ctx`` tokens) into one
decode; each input's vector is read with ``llama_get_embeddings_seq`` (a view, normalized with
numpy) and sent as float32 bytes.
"""

from __future__ import annotations

import array
import logging
import os
from collections import deque
from dataclasses import dataclass

import llama_cpp
import numpy as np

from engine_proc.backends.base import Backend, BackendConfig, ModelInfo, RequestRejected
from engine_proc.backends.llama_vocab import (
    LlamaTokenizer,
    install_heartbeat,
    open_model,
    release,
)
from ipc.records import Delta, FinishReason, Kind, Submit

log = logging.getLogger("axserving.engine.llama_embed")

POOLING = {"mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN, "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS,
           "last": llama_cpp.LLAMA_POOLING_TYPE_LAST}


@dataclass
class _Input:
    rid: int
    index: int
    tokens: list[int]


class LlamaEmbeddingBackend(Backend):
    name = "llama_cpp"
    # Tokens per decode (an input longer than this gets a decode of its own). Throughput is
    # the same from 128 to 2048 here (about 300 tokens/s of prefill on 2 threads, measured with
    # 64 inputs); a bounded step keeps cancellation and the heartbeat prompt.
    TOKENS_PER_STEP = 512

    def __init__(self, config: BackendConfig) -> None:
        super().__init__(config)
        self._llama: llama_cpp.Llama | None = None
        self._ctx: llama_cpp.llama_context_p | None = None
        self._batch: llama_cpp.llama_batch | None = None
        self._waiting: deque[_Input] = deque()
        self._counted: dict[int, int] = {}  # rid -> input tokens so far
        self._left: dict[int, int] = {}  # rid -> inputs not yet answered
        self._n_ctx = self._n_seq = self._n_embd = 0

    def load(self) -> ModelInfo:
        cfg = self.config
        llama = self._llama = open_model(cfg.model_path)
        tok = self._tok = LlamaTokenizer(llama)
        self.tokenizer = tok
        arch = llama.metadata.get("general.architecture", "")
        own = f"{arch}.pooling_type" in llama.metadata
        pooling = POOLING.get(cfg.pooling) if cfg.pooling else (
            llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED if own else llama_cpp.LLAMA_POOLING_TYPE_MEAN)
        params = llama_cpp.llama_context_default_params()
        params.embeddings = True
        params.pooling_type = pooling
        params.kv_unified = True
        params.n_ctx = cfg.n_ctx
        params.n_batch = params.n_ubatch = cfg.n_ctx  # an input is computed in one ubatch, whole
        self._n_seq = params.n_seq_max = max(1, min(cfg.max_batch, 256))
        params.n_threads = params.n_threads_batch = cfg.n_threads or os.cpu_count() or 1
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(llama.model, params)
        if self._ctx is None:
            raise RuntimeError(f"{cfg.model_path}: could not create an embeddings context")
        if llama_cpp.llama_pooling_type(self._ctx) == llama_cpp.LLAMA_POOLING_TYPE_NONE:
            raise RuntimeError("the model's pooling type is none: no sentence vectors (set pooling: mean)")
        self._n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        self._n_embd = llama_cpp.llama_model_n_embd(llama.model)
        self._batch = llama_cpp.llama_batch_init(self._n_ctx, 0, 1)
        self._encoder = bool(llama_cpp.llama_model_has_encoder(llama.model))
        log.info("embeddings: %d dimensions, pooling %s, %d inputs x %d tokens per decode",
                 self._n_embd, cfg.pooling or ("the model's" if own else "mean"), self._n_seq, self._n_ctx)
        return ModelInfo(backend=self.name, n_ctx=self._n_ctx, description=f"embeddings ({self._n_embd} dims)")

    def native_heartbeat(self, callback: int, address: int) -> bool:
        self._beat = install_heartbeat(self._ctx, callback, address)
        return True

    def submit(self, request: Submit) -> None:
        if request.kind is not Kind.embed:
            raise RequestRejected("invalid_request", "this model is loaded for embeddings; it does not generate", "model")
        tok = self._tok
        if request.inputs_ids:
            inputs = []
            for i, packed in enumerate(request.inputs_ids):
                ids = array.array("i")
                ids.frombytes(packed)
                if any(not 0 <= t < tok.n_vocab for t in ids):
                    raise RequestRejected("invalid_request", f"input {i} has a token id outside the vocabulary", "input")
                inputs.append(ids.tolist())
        else:
            inputs = [tok.completion_tokens(text) for text in request.inputs]
        for i, tokens in enumerate(inputs):
            if len(tokens) > self._n_ctx:
                raise RequestRejected(
                    "context_length_exceeded",
                    f"input {i} has {len(tokens)} tokens; this model embeds at most {self._n_ctx}", "input")
            if not tokens:
                raise RequestRejected("invalid_request", f"input {i} is empty", "input")
        self._counted[request.rid] = 0
        self._left[request.rid] = len(inputs)
        self._waiting.extend(_Input(request.rid, i, t) for i, t in enumerate(inputs))

    def step(self) -> list[Delta]:
        for inp in [x for x in self._waiting if self.cancelled(x.rid)]:
            self._drop(inp.rid)
            if inp.rid not in self.dropped:
                self.dropped.append(inp.rid)
        if not self._waiting:
            return []
        take: list[_Input] = []
        used = 0
        limit = max(self.TOKENS_PER_STEP, len(self._waiting[0].tokens))
        while self._waiting and len(take) < self._n_seq and used + len(self._waiting[0].tokens) <= min(limit, self._n_ctx):
            used += len(self._waiting[0].tokens)
            take.append(self._waiting.popleft())
        batch, ctx = self._batch, self._ctx
        assert batch is not None and ctx is not None
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        i = 0
        for seq, inp in enumerate(take):
            for pos, t in enumerate(inp.tokens):
                batch.token[i] = t
                batch.pos[i] = pos  # type: ignore[call-overload]
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = 1
                i += 1
        batch.n_tokens = i
        rc = (llama_cpp.llama_encode if self._encoder else llama_cpp.llama_decode)(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for an embeddings batch")
        deltas = []
        for seq, inp in enumerate(take):
            ptr = llama_cpp.llama_get_embeddings_seq(ctx, seq)
            vec = np.ctypeslib.as_array(ptr, shape=(self._n_embd,)).astype(np.float32)
            norm = float(np.linalg.norm(vec))
            if norm > 0:
                vec /= norm
            self._counted[inp.rid] += len(inp.tokens)
            self._left[inp.rid] -= 1
            deltas.append(Delta(inp.rid, finish_reason=FinishReason.stop, prompt_tokens=self._counted[inp.rid],
                                index=inp.index, embedding=vec.tobytes()))
            if not self._left[inp.rid]:
                del self._left[inp.rid], self._counted[inp.rid]
        return deltas

    def _drop(self, rid: int) -> None:
        self._waiting = deque(x for x in self._waiting if x.rid != rid)
        self._left.pop(rid, None)
        self._counted.pop(rid, None)

    def abort(self, rid: int) -> None:
        self._drop(rid)

    def has_work(self) -> bool:
        return bool(self._waiting)

    def occupancy(self) -> tuple[int, int]:
        return 0, len(self._waiting)

    def close(self) -> None:
        release(self._batch, self._ctx, self._llama)
        self._batch = self._ctx = self._llama = None
