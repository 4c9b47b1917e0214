"""The MLX backend (mlx-lm), with continuous batching: Metal on Apple Silicon, CPU on Linux.

It implements the runtime seam only. Requests become choices through :mod:`.intake` (prompt,
chat template, limits), slots and prefix reuse come from :mod:`.batching`'s
:class:`~engine_proc.backends.batching.SlotTable` and a step's budget from its
:func:`~engine_proc.backends.batching.share_budget`, and every drawn token goes through the
shared output layer (:class:`~engine_proc.output.ChoiceOutput`: text, stops, grammar, tools,
logprobs). The vocabulary is :class:`~engine_proc.backends.hf_vocab.HFTokenizer`.

The KV caches are mlx-lm's, arranged as its ``BatchGenerator`` arranges them:

- a prompt is prefilled in its own per-layer ``KVCache`` list, in chunks of what the step's
  budget leaves it, beside the running streams;
- once its prompt is in, it joins the decoding batch: its cache is merged into the batch's
  left-padded ``BatchKVCache`` (one per layer), and every decoding sequence then advances in
  one forward pass of the batch per step;
- when a sequence ends, its rows are extracted back into a ``KVCache`` and kept as the idle
  cache entry of its slot, which the next request sharing a prefix with it (the same system
  prompt, the chat's next turn) takes over, trimmed to the shared prefix (mlx-lm's prompt
  cache reuse), instead of computing it again.

Logits come back to NumPy once per step (a batch by vocabulary float32 array), where the
grammar mask, logprobs and :class:`~engine_proc.backends.np_sampling.NumpySampler` run.

On Linux the ``mlx[cpu]`` wheel computes on a reference CPU path, much slower than llama.cpp:
this backend is a correctness path there and a speed path only on Apple's Metal.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine_proc.backends.base import BackendConfig, ModelInfo
from engine_proc.backends.hf_vocab import HFTokenizer
from engine_proc.backends.intake import Choice, ChoiceBackend
from engine_proc.backends.np_sampling import NumpySampler
from engine_proc.output import token_logprob
from engine_proc.spec import size_bytes
from ipc.records import Delta

log = logging.getLogger("axserving.engine.mlx")

# Backend options (``backend_options`` in the model's config), sizes in bytes or '8GiB'.
OPTION_MEMORY_LIMIT = "memory_limit"  # mx.set_memory_limit: MLX's allocator stays under it
OPTION_WIRED_LIMIT = "wired_limit"  # mx.set_wired_limit (Metal): memory kept resident for the model
OPTION_CACHE_LIMIT = "cache_limit"  # mx.set_cache_limit: freed buffers MLX keeps for reuse

STEP_TARGET_S = 1.0  # the longest a step's budget may make a step (measured at load)


class MlxBackend(ChoiceBackend):
    name = "mlx"

    def __init__(self, config: BackendConfig) -> None:
        # A slot's prefix is reused in place only: one sequence's KV cannot share another's.
        super().__init__(config, share=False)
        self._mx: Any = None  # mlx.core, imported by load()
        self._model: Any = None
        self._n_batch = 0
        self._idle: dict[int, list[Any]] = {}  # slot -> the per-layer KVCache list it keeps
        self._rows: list[Choice] = []  # the decoding batch, in the order of its cache's rows
        self._batch_cache: list[Any] | None = None  # one BatchKVCache per layer, or None

    # ---- lifecycle ---------------------------------------------------------------------------

    def load(self) -> ModelInfo:
        cfg = self.config
        import mlx.core as mx
        from mlx_lm.utils import load_model

        self._mx = mx
        path = Path(cfg.model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not an MLX model directory (no config.json)")
        metal = mx.metal.is_available()
        if not metal:
            mx.set_default_device(mx.cpu)
        self._limits(metal)
        if cfg.kv_unified:
            log.warning("kv_unified does not apply to MLX: each sequence has its own KV cache (ignored)")
        if cfg.flash_attn:
            log.warning("flash_attn is llama.cpp's: MLX runs its own attention kernel (ignored)")
        if cfg.draft_tokens:
            log.warning("draft_tokens: prompt-lookup drafting is llama.cpp's here; MLX decodes one token a step (ignored)")
        if cfg.n_threads and not metal:
            log.info("threads=%d: MLX's CPU path picks its own threads (ignored)", cfg.n_threads)
        began = time.monotonic()
        self._model, model_config = load_model(path)
        self._tok = self.tokenizer = HFTokenizer(path)
        self._max_piece = self._tok.longest_piece()
        trained = int(model_config.get("max_position_embeddings") or cfg.n_ctx)
        self._n_ctx = min(cfg.n_ctx, trained)
        self._n_batch, step_s = self._step_budget()
        description = self._description(path, model_config)
        log.info(
            "MLX on %s: %s loaded in %.1f s; %d tokens per request, %d sequences, batch %d tokens "
            "(a full step took %.2f s)",
            "Metal" if metal else "the CPU", description, time.monotonic() - began, self._n_ctx,
            self._slots.n_slots, self._n_batch, step_s,
        )
        return ModelInfo(backend=self.name, n_ctx=self._n_ctx, description=description, step_s=step_s)

    def _limits(self, metal: bool) -> None:
        import mlx.core as mx

        for option, setter, needs_metal in (
            (OPTION_MEMORY_LIMIT, mx.set_memory_limit, False),
            (OPTION_CACHE_LIMIT, mx.set_cache_limit, False),
            (OPTION_WIRED_LIMIT, mx.set_wired_limit, True),
        ):
            raw = self.config.option(option)
            if not raw:
                continue
            try:
                value = size_bytes(raw)
            except ValueError as e:
                raise ValueError(f"backend option {option}={raw!r}: {e}") from None
            if needs_metal and not metal:
                log.info("backend option %s applies on Metal only; ignored on the CPU", option)
                continue
            setter(value)
            log.info("MLX %s set to %d bytes", option, value)

    @staticmethod
    def _description(path: Path, config: dict[str, Any]) -> str:
        quant = config.get("quantization") or {}
        bits = f", {quant.get('bits')}-bit" if quant else ""
        return f"{path.name} (mlx, {config.get('model_type', '?')}{bits})"

    def _step_budget(self) -> tuple[int, float]:
        """A step's token budget and how long a full step takes, measured.

        ``n_batch`` tokens per step, unless a step that big would take more than
        :data:`STEP_TARGET_S`: on Metal it takes milliseconds, on the Linux CPU path a token costs
        about 0.1 s (SmolLM2), and a 512-token chunk a minute, so the budget shrinks to what fits
        (never under two tokens per slot, so prefill always moves beside a full batch). The
        front's hang limit follows the step time reported, since MLX cannot beat the heartbeat
        from inside its kernels."""
        probe = min(16, self._n_ctx - 1)
        self._forward_time(probe)  # the first call also pays for building the kernels
        per_token = self._forward_time(probe) / probe
        floor = 2 * self._slots.n_slots
        budget = max(self.config.n_batch, floor)
        if per_token * budget > STEP_TARGET_S:
            budget = max(floor, int(STEP_TARGET_S / per_token))
        budget = min(budget, self._n_ctx - 1)
        return budget, self._forward_time(budget)

    def _forward_time(self, n: int) -> float:
        from mlx_lm.models.cache import make_prompt_cache

        mx = self._mx
        cache = make_prompt_cache(self._model)
        began = time.monotonic()
        mx.eval(self._model(mx.zeros((1, n), dtype=mx.int32), cache=cache)[:, -1, :])
        return time.monotonic() - began

    def close(self) -> None:
        self._waiting.clear()
        self._running.clear()
        self._rows.clear()
        self._batch_cache = None
        self._idle.clear()
        self._model = None
        self._tok = None

    # ---- requests ----------------------------------------------------------------------------

    def abort(self, rid: int) -> None:
        """Drop every choice of the request; their KV is freed now, not kept as a cache."""
        self._end([s for s in self._running if s.rid == rid], keep_cache=False)
        for seq in [s for s in self._waiting if s.rid == rid]:
            self._waiting.remove(seq)

    def kv_usage(self) -> float:
        return min(1.0, self.held_tokens() / max(1, self._n_ctx * self._slots.n_slots))

    # ---- scheduling --------------------------------------------------------------------------

    def _admit(self) -> None:
        """Start waiting requests while there are free slots (FIFO)."""
        from mlx_lm.models.cache import make_prompt_cache

        slots = self._slots
        while self._waiting and slots.free() >= 1 + len(self._waiting[0].followers):
            seq = self._waiting.popleft()
            # A seeded request is computed from scratch, the one way (see batching.share_budget).
            place = slots.place(seq.tokens, {}) if not seq.exact else slots.place([], {})
            seq.slot = place.slot
            kept = self._idle.pop(place.slot, None)
            if place.donor == place.slot and kept is not None and place.reuse > 0:
                for layer in kept:
                    layer.trim(layer.offset - place.reuse)
                seq.cache, seq.n_past = kept, place.reuse
            else:
                seq.cache, seq.n_past = make_prompt_cache(self._model), 0
            seq.out.n_cached = seq.n_past
            seq.sampler = self._sampler(seq)
            for f in seq.followers:  # they take the leader's KV once it is prefilled
                f.slot = slots.place([], {}).slot
                self._idle.pop(f.slot, None)
                f.sampler = self._sampler(f)
            self._running.append(seq)

    @staticmethod
    def _sampler(seq: Choice) -> NumpySampler:
        return NumpySampler(seq.params, seq.out.gen.logit_bias)

    def _end(self, seqs: list[Choice], keep_cache: bool) -> None:
        """Take running sequences out; keep their KV as their slots' cache entries, or free it."""
        if not seqs:
            return
        gone = {id(s) for s in seqs}
        rows = {i for i, s in enumerate(self._rows) if id(s) in gone}
        for seq in seqs:
            self._running.remove(seq)
            for f in seq.followers:  # still waiting for the prompt: nothing of theirs is held
                self._slots.release(f.slot, None)
            seq.followers = []
        if rows and self._batch_cache is not None:
            if keep_cache:
                for i in rows:
                    seq = self._rows[i]
                    self._idle[seq.slot] = [layer.extract(i) for layer in self._batch_cache]
            keep = [i for i in range(len(self._rows)) if i not in rows]
            self._rows = [self._rows[i] for i in keep]
            if keep:
                for layer in self._batch_cache:
                    layer.filter(keep)
            else:
                self._batch_cache = None
        for seq in seqs:
            held = keep_cache and seq.slot in self._idle
            if not held:
                self._idle.pop(seq.slot, None)
            self._slots.release(seq.slot, seq.tokens[: seq.n_past] if held else None)
            seq.cache = None

    def _join_batch(self, seqs: list[Choice], cache: list[Any]) -> None:
        """Sequences whose prompt is in (a leader and its followers) start decoding together:
        the prompt's KV becomes their rows of the batch cache (copied, one row each)."""
        from mlx_lm.models.cache import KVCache

        merged = [KVCache.merge([layer] * len(seqs)) for layer in cache]
        if self._batch_cache is None:
            self._batch_cache = merged
        else:
            for mine, theirs in zip(self._batch_cache, merged, strict=True):
                mine.extend(theirs)
        self._rows.extend(seqs)
        for seq in seqs:
            seq.cache = None

    # ---- generation --------------------------------------------------------------------------

    def step(self) -> list[Delta]:
        if self._model is None:
            raise RuntimeError("MlxBackend.step() before load() or after close()")
        self._end(self.cancelled_prefills(), keep_cache=False)  # their Abort follows
        self._admit()
        if not self._running:
            return []
        mx, model = self._mx, self._model
        began = time.monotonic()
        plan = self._plan()
        planned = dict(zip(map(id, self._running), plan, strict=True))
        outputs: list[tuple[list[Choice], Any]] = []  # who draws, from which logits row
        if self._rows:
            inputs = mx.array([[s.tokens[-1]] for s in self._rows], dtype=mx.int32)
            logits = model(inputs, cache=self._batch_cache)[:, -1, :]
            outputs += [([s], logits[i]) for i, s in enumerate(self._rows)]
        prefilling: list[tuple[Choice, int]] = []
        for seq in self._running:
            n = planned[id(seq)]
            if seq.cache is None or not n:
                continue
            chunk = seq.tokens[seq.n_past : seq.n_past + n]
            last = seq.n_past + n == len(seq.tokens)
            if last and n > 1:
                # Only the last position's logits are drawn from: the rest of the chunk goes
                # first, its logits never evaluated (lazy), so the vocabulary projection runs for
                # one row, not n (as mlx-lm's generate_step prefills).
                model(mx.array([chunk[:-1]], dtype=mx.int32), cache=seq.cache)
                chunk = chunk[-1:]
            out = model(mx.array([chunk], dtype=mx.int32), cache=seq.cache)
            prefilling.append((seq, n))
            if last:
                outputs.append(([seq, *seq.followers], out[0, -1, :]))
        rows = mx.stack([row for _, row in outputs]).astype(mx.float32) if outputs else None
        mx.eval(rows, [layer.state for s, _ in prefilling for layer in s.cache])
        self._paced(time.monotonic() - began)
        for seq in self._rows:
            seq.n_past += 1
        for seq, n in prefilling:
            self.prefill_tokens += min(seq.n_past + n, seq.n_prompt) - min(seq.n_past, seq.n_prompt)
            seq.n_past += n
        deltas: list[Delta] = []
        table = np.asarray(rows) if rows is not None else None
        for i, (seqs, _) in enumerate(outputs):
            assert table is not None
            leader = seqs[0]
            if leader.cache is not None:  # the prompt is in: the choices join the batch
                for f in seqs[1:]:
                    f.n_past = leader.n_past
                    f.out.n_cached = leader.out.n_cached
                    self._running.append(f)
                leader.followers = []
                self._join_batch(seqs, leader.cache)
            for seq in seqs:
                deltas.append(self._draw(seq, table[i]))
        self._end([s for s in self._running if s.out.finish is not None], keep_cache=True)
        return deltas

    def _draw(self, seq: Choice, logits: np.ndarray) -> Delta:
        """Draw the sequence's next token from its logits row and turn it into output."""
        out = seq.out
        assert self._tok is not None
        if out.constraint is not None:
            logits = logits.copy()  # followers draw from the same row
            out.constraint.apply(logits)
        token = seq.sampler.sample(logits)
        seq.tokens.append(token)
        lp = token_logprob(logits, token, out.gen.logprobs, self._tok) if out.gen.logprobs >= 0 else None
        return out.accept(token, lp, at_limit=len(seq.tokens) >= self._n_ctx)
