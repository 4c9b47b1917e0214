"""The llama.cpp backend (llama-cpp-python bindings), with continuous batching.

The high-level ``llama_cpp.Llama`` object loads the model, tokenizes, and gives us the GGUF
metadata (chat template). Generation runs on the low-level API in a context of our own with
``max_batch`` sequence ids: every step puts one token of every decoding
sequence plus chunks of the prompts being prefilled into one ``llama_batch`` and one
``llama_decode``, then draws each sequence's next token with its own native sampler chain
(:mod:`.llama_sampling`; no logits are copied into Python). Text comes out through :mod:`.detok`
(UTF-8 reassembly, stop strings).

Which slot a request runs in, what prompt prefix it reuses from the cache, and how a step's token
budget is shared are decided in :mod:`.batching`. By default each sequence has its own n_ctx KV
cells (``kv_unified`` off) and its own attention, so what runs beside a request does not change
its output (bar rounding in batched kernels, seen on some models). With a
unified cache (one shared pool of n_ctx cells) the pool can run out: idle cache entries go first,
then the most recently started sequence is preempted: its KV is dropped, it waits at the head of
the queue, and its tokens so far are recomputed when it runs again (nothing is lost or
truncated; its stream simply pauses).
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import time

import llama_cpp
import numpy as np

from engine_proc.backends.base import BackendConfig, ModelInfo
from engine_proc.backends.intake import Choice, ChoiceBackend
from engine_proc.backends.llama_sampling import SamplerChain
from engine_proc.backends.lookup import DraftCost, NgramDraft, plan_drafts
from engine_proc.backends.llama_vocab import (
    LlamaTokenizer,
    install_heartbeat,
    open_model,
    release,
)
from engine_proc.output import token_logprob
from engine_proc.spec import flash_attn_setting
from ipc.records import Delta, merge

log = logging.getLogger("axserving.engine.llama_cpp")

_KV_FULL = 1  # llama_decode: no KV slot for the batch (nothing was computed; safe to retry)
# max_batch auto: a doubled batch must decode this much faster to be used (see _measure_batch).
BATCH_GAIN = 1.20
MIN_AUTO_BATCH = 8  # below it a doubled batch gains far more (memory-bound): not measured
_MEASURE_ROUNDS = 3
_MEASURE_CONTEXT = 256  # tokens of context each measured sequence holds
_MEASURE_STEPS = 2  # timed decode steps per size and round
_MEASURE_BUDGET_S = 3.0  # no further round once measuring took this long
FA_TILE_ROWS = 64  # ggml-cpu's GGML_FA_TILE_Q: a stream's query rows from which attention is tiled
FLASH_ATTN_TYPES = {
    True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
    None: llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
}


_NONE_FED: tuple[list[int], int] = ([], 0)  # a sequence fed nothing after its pending token


def _by_slot(item: tuple[Choice, int]) -> int:
    return item[0].slot


class LlamaDecodeError(RuntimeError):
    """``llama_decode`` failed; the KV cache state is no longer trustworthy."""


class LlamaCppBackend(ChoiceBackend):
    name = "llama_cpp"

    def __init__(self, config: BackendConfig) -> None:
        # A split cache copies a donor's whole buffer (n_ctx cells of every layer) to share a
        # prefix: a few ms, against tens of ms per prompt token computed, so worth it from a
        # prefix of n_ctx / 32 tokens (128 of 4096) on; a unified one shares cells for free.
        min_share = 1 if config.kv_unified else max(64, config.n_ctx // 32)
        super().__init__(config, share=True, min_share=min_share)
        self._llama: llama_cpp.Llama | None = None
        self._ctx: llama_cpp.llama_context_p | None = None
        self._memory: llama_cpp.llama_memory_t | None = None
        self._batch: llama_cpp.llama_batch | None = None
        self._n_batch = 0
        self._n_vocab = 0
        self._beat_cb: object = None  # the ctypes callback object, kept alive while installed
        # After a preemption, admit nothing new until some sequence has ended: the cache is full.
        self._admit_blocked = False
        self.preemptions = 0
        self._draft_costs: dict[int, DraftCost] = {}  # decoding streams -> what drafting costs beside them

    # ---- lifecycle ---------------------------------------------------------------------------

    def load(self) -> ModelInfo:
        cfg = self.config
        n_threads = cfg.n_threads or os.cpu_count() or 1
        # The Llama object is only the model, its vocab and metadata: its own context is kept
        # tiny, and generation runs in one created below with max_batch sequences.
        llama = self._llama = open_model(cfg.model_path)
        self._tok = self.tokenizer = LlamaTokenizer(llama)
        n_seq = self._slots.n_slots
        self._n_batch = max(cfg.n_batch, n_seq)
        params = llama_cpp.llama_context_default_params()
        # Split (default): every sequence has its own n_ctx cells and its attention runs alone,
        # so batch neighbours do not change its output (bit for bit on SmolLM2 for short prompts
        # and contexts: llama.cpp picks attention kernels by a step's shape, so a 64+ token prompt
        # prefilled in pieces, or a lone row past 256 tokens of context, rounds apart from a
        # batch's, measured; on Gemma 3 Q4_K_M batched kernels round differently, and a greedy
        # reply can fork).
        # Unified: one pool of n_ctx cells for all sequences (less memory); prefixes are shared
        # across running requests, a full pool preempts, and interleaved cells change the
        # attention's summation order, so a greedy continuation can fork in the last bits.
        params.kv_unified = cfg.kv_unified
        params.n_ctx = cfg.n_ctx if cfg.kv_unified else cfg.n_ctx * n_seq
        params.n_batch = params.n_ubatch = self._n_batch
        params.n_seq_max = n_seq
        params.n_threads = params.n_threads_batch = n_threads
        params.no_perf = True
        params.flash_attn_type = FLASH_ATTN_TYPES[cfg.flash_attn]  # see DEFAULT_FLASH_ATTN
        self._ctx = llama_cpp.llama_init_from_model(llama.model, params)
        if self._ctx is None:
            raise RuntimeError(f"{cfg.model_path}: could not create a llama.cpp context")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        if self._memory is None:
            raise RuntimeError(f"{cfg.model_path}: the context has no KV memory (not a decoder?)")
        llama_cpp.llama_memory_clear(self._memory, True)
        # What one request may use: n_ctx either way (llama.cpp rounds up to a multiple of 256).
        self._n_ctx = llama_cpp.llama_n_ctx_seq(self._ctx)
        self._n_vocab = self._tok.n_vocab
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._max_piece = self._tok.longest_piece()
        # llama.cpp's CPU flash attention computes a stream's query rows in tiles from
        # GGML_FA_TILE_Q (64) rows on, one row at a time under it, which costs more the longer
        # the context: beside decoding streams, prompts go in whole tiles where they can (see
        # batching.PrefillPacer). Split KV only: one stream per sequence, its rows counted alone.
        if cfg.flash_attn is not False and not cfg.kv_unified:
            self._prefill_tile = FA_TILE_ROWS

        if cfg.measure_batch and n_seq > 1:
            self._slots.max_running = self._measure_batch(n_seq)
        if cfg.draft_tokens > 0:
            self._reserve_outputs(n_seq * (1 + cfg.draft_tokens))

        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(llama.model, desc, len(desc))
        name = llama.metadata.get("general.name", "")
        description = f"{name} ({desc.value.decode()})" if name else desc.value.decode()
        log.info(
            "context: %d tokens per request, %d sequences, %s KV cache of %d cells, "
            "batch %d tokens, %d threads, flash attention %s",
            self._n_ctx, n_seq, "unified" if cfg.kv_unified else "split",
            llama_cpp.llama_n_ctx(self._ctx), self._n_batch, n_threads, flash_attn_setting(cfg),
        )
        return ModelInfo(backend=self.name, n_ctx=self._n_ctx, description=description)

    def _measure_batch(self, n_seq: int) -> int:
        """How many sequences to decode together: from ``MIN_AUTO_BATCH`` on, double while the
        doubled batch decodes at least ``BATCH_GAIN`` times as many tokens a second.

        Doubling a batch doubles every stream's step, its inter-token latency: worth it only
        for that much more throughput. On a CPU the maths is compute-bound well before 16
        sequences (SmolLM2, 2 threads: a 16-stream step decoded 5-14% more tokens a second than
        an 8-stream one on an empty cache, 3-8% with a few hundred tokens of context each, in
        twice the time). Sizes are measured in turns, a few rounds, each its fastest step: what
        else runs on the machine meanwhile (another engine loading) weighs on all alike."""
        mem = self._memory
        assert mem is not None
        sizes: list[int] = []
        size = min(MIN_AUTO_BATCH, n_seq)
        while True:
            sizes.append(size)
            if size >= n_seq:
                break
            size = min(2 * size, n_seq)
        if len(sizes) < 2:
            return n_seq

        decode = self._decode_filler
        # Every sequence holds a context of its own first, as served ones do: each attends to
        # its own cells, a cost per sequence that an empty cache hides (on SmolLM2 it made 16
        # streams look 15-25% faster than 8; at 250 tokens of context they were 3-8% faster).
        context = min(_MEASURE_CONTEXT, self._n_batch, self._n_ctx // 2)
        fastest = dict.fromkeys(sizes, float("inf"))
        try:
            if not decode([(0, p, p == context - 1) for p in range(context)]):
                return n_seq
            for seq in range(1, sizes[-1]):
                llama_cpp.llama_memory_seq_cp(mem, 0, seq, -1, -1)
            pos = [context] * sizes[-1]
            began = time.perf_counter()
            for _ in range(_MEASURE_ROUNDS):
                for size in sizes:
                    for step in range(_MEASURE_STEPS + 1):  # the first step of a size warms it up
                        t0 = time.perf_counter()
                        if not decode([(seq, pos[seq], True) for seq in range(size)]):
                            return n_seq
                        if step:
                            fastest[size] = min(fastest[size], time.perf_counter() - t0)
                        for seq in range(size):
                            pos[seq] += 1
                if time.perf_counter() - began > _MEASURE_BUDGET_S:
                    break
        finally:
            llama_cpp.llama_memory_clear(mem, True)
        rates = {b: b / t for b, t in fastest.items()}
        chosen = sizes[0]
        for smaller, larger in zip(sizes, sizes[1:], strict=False):
            if rates[larger] < BATCH_GAIN * rates[smaller]:
                break
            chosen = larger
        log.info(
            "max_batch auto: decode rates %s tok/s; running up to %d of %d sequences at once",
            ", ".join(f"{b}: {r:.0f}" for b, r in rates.items()), chosen, n_seq,
        )
        return chosen

    def _decode_filler(self, entries: list[tuple[int, int, bool]]) -> bool:
        """Decode token 0 at each (sequence, position, logits) entry: load-time measurements."""
        batch = self._batch
        assert batch is not None
        for i, (seq, pos, logits) in enumerate(entries):
            batch.token[i] = 0
            batch.pos[i] = pos  # type: ignore[call-overload]
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(entries)
        return llama_cpp.llama_decode(self._ctx, batch) == 0

    def _reserve_outputs(self, n: int) -> None:
        """Have llama.cpp size its logits buffer for ``n`` rows now (a step with drafted tokens
        outputs up to this many): it grows the buffer the first time a step outputs more rows
        than before, which made that step slow and its drafted tokens look dear."""
        try:
            self._decode_filler([(0, i, True) for i in range(min(n, self._n_batch, self._n_ctx))])
        finally:
            llama_cpp.llama_memory_clear(self._memory, True)

    def native_heartbeat(self, callback: int, address: int) -> bool:
        self._beat_cb = install_heartbeat(self._ctx, callback, address)
        return True

    def close(self) -> None:
        for seq in list(self._running):
            self._end(seq, keep_cache=False)
        self._waiting.clear()
        release(self._batch, self._ctx, self._llama)
        self._batch = self._ctx = self._llama = None
        self._tok = None
        self._memory = None

    # ---- requests ----------------------------------------------------------------------------

    def abort(self, rid: int) -> None:
        """Drop every choice of the request; their KV is freed now, not kept as a cache."""
        for seq in [s for s in self._running if s.rid == rid]:
            self._end(seq, keep_cache=False)
        for seq in [s for s in self._waiting if s.rid == rid]:
            self._waiting.remove(seq)
            self._park_followers(seq, release=True)
            self._free_sampler(seq)

    def kv_usage(self) -> float:
        if self._ctx is None:
            return 0.0
        return min(1.0, self.held_tokens() / max(1, llama_cpp.llama_n_ctx(self._ctx)))

    # ---- scheduling --------------------------------------------------------------------------

    def _admit(self) -> None:
        """Start waiting requests while there are free slots (FIFO; preempted ones first)."""
        slots = self._slots
        later: list[Choice] = []  # waiting for a prefix a running sequence is computing
        for s in self._running:
            s.awaited = 0
        if self._waiting and not self._admit_blocked:
            slots.claim(s.tokens for s in itertools.islice(self._waiting, slots.free()) if not s.exact)
        while self._waiting and not self._admit_blocked:
            seq = self._waiting[0]
            if slots.free() < 1 + len(seq.followers):
                break  # a request's choices start together (they share its prefill)
            self._waiting.popleft()
            if seq.exact:  # computed from scratch, the one way (see batching.share_budget)
                place = slots.place(seq.tokens, {})
                reuse = self._place_kv(place.slot, None, 0)
            else:
                running_kv = {s.slot: (s.tokens, s.n_past) for s in self._running}
                awaited = slots.awaited(seq.tokens, running_kv)
                if awaited is not None:
                    leader = next(s for s in self._running if s.slot == awaited[0])
                    leader.awaited = max(leader.awaited, awaited[1])
                    later.append(seq)
                    continue
                place = slots.place(seq.tokens, running_kv)
                reuse = self._place_kv(place.slot, place.donor, place.reuse)
            seq.slot = place.slot
            seq.n_past = reuse
            if seq.sampler is None:  # first start (a preempted sequence keeps its sampler)
                seq.out.n_cached = reuse
                seq.sampler = self._sampler(seq)
            for f in seq.followers:  # their KV is copied from the leader's once it is prefilled
                f.slot = slots.place(f.tokens, {}).slot
                llama_cpp.llama_memory_seq_rm(self._memory, f.slot, -1, -1)
                f.sampler = f.sampler or self._sampler(f)
            self._running.append(seq)
        self._waiting.extendleft(reversed(later))  # still first in line, in their order
        slots.claim(())

    def _shares_first(self, slot: int, decoding: set[int]) -> int:
        """llama.cpp splits a step into micro-batches over runs of consecutive sequence ids,
        each sequence giving as many rows as the one with fewest (``split_equal``): a prompt whose
        slot neighbours a decoding one gives its first row to their micro-batch (a batch listed in
        slot order, as :meth:`_fill_batch` lists it), the rest are its own."""
        return int(slot - 1 in decoding or slot + 1 in decoding)

    def _sampler(self, seq: Choice) -> SamplerChain:
        return SamplerChain(seq.params, self._n_vocab, seq.out.gen.logit_bias)

    def _park_followers(self, seq: Choice, release: bool) -> None:
        """Give back the slots of a leader's followers (preempted: they are placed again when it
        restarts; ``release``: the request is gone, free their samplers too)."""
        for f in seq.followers:
            if f.slot >= 0:
                self._slots.release(f.slot, None)
                f.slot = -1
            if release:
                self._free_sampler(f)

    def _place_kv(self, slot: int, donor: int | None, reuse: int) -> int:
        """Make ``slot``'s KV hold exactly the first ``reuse`` tokens; return what it holds."""
        mem = self._memory
        if donor == slot:
            kept = llama_cpp.llama_memory_seq_rm(mem, slot, reuse, -1)
        else:
            llama_cpp.llama_memory_seq_rm(mem, slot, -1, -1)
            kept = donor is not None and reuse > 0
            if kept and self.config.kv_unified:
                llama_cpp.llama_memory_seq_cp(mem, donor, slot, 0, reuse)
            elif kept:
                # Split: one stream copies only whole (the copy is made at the next decode,
                # of the donor as it is now); then the donor's tail is dropped here.
                llama_cpp.llama_memory_seq_cp(mem, donor, slot, -1, -1)
                kept = llama_cpp.llama_memory_seq_rm(mem, slot, reuse, -1)
        # Reuse only a whole prefix: not if the cache cannot drop a tail (recurrent state), nor
        # if it has let go of early positions (sliding-window layers keep only the window).
        if kept and reuse > 0 and llama_cpp.llama_memory_seq_pos_min(mem, slot) == 0:
            return reuse
        llama_cpp.llama_memory_seq_rm(mem, slot, -1, -1)
        return 0

    def _end(self, seq: Choice, keep_cache: bool) -> None:
        """Take a running sequence out; keep its KV as a prefix-cache entry, or free it."""
        self._running.remove(seq)
        self._park_followers(seq, release=True)
        seq.followers = []
        self._free_sampler(seq)
        if not keep_cache and self._memory is not None:
            llama_cpp.llama_memory_seq_rm(self._memory, seq.slot, -1, -1)
        self._slots.release(seq.slot, seq.tokens[: seq.n_past] if keep_cache else None)
        self._admit_blocked = False

    @staticmethod
    def _free_sampler(seq: Choice) -> None:
        if seq.sampler is not None:
            seq.sampler.free()
            seq.sampler = None

    def _make_room(self) -> bool:
        """The KV cache is full: drop an idle cache entry, else preempt the newest sequence."""
        slot = self._slots.evict()
        if slot is not None:
            llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
            return True
        if len(self._running) < 2:
            return False
        seq = self._running.pop()
        llama_cpp.llama_memory_seq_rm(self._memory, seq.slot, -1, -1)
        self._slots.release(seq.slot, None)
        self._park_followers(seq, release=False)
        seq.n_past = 0
        self._waiting.appendleft(seq)
        self._admit_blocked = True
        self.preemptions += 1
        log.info("KV cache full: request %d preempted (%d tokens to recompute)", seq.rid, len(seq.tokens))
        return True

    # ---- generation --------------------------------------------------------------------------

    def step(self) -> list[Delta]:
        if self._ctx is None:
            raise RuntimeError("LlamaCppBackend.step() before load() or after close()")
        for seq in self.cancelled_prefills():
            self._end(seq, keep_cache=False)  # its Abort follows
        self._admit()
        if not self._running:
            return []
        while True:
            plan = self._plan()
            drafts = self._drafts(plan)
            outputs = self._fill_batch(plan, drafts)
            began = time.perf_counter()
            rc = llama_cpp.llama_decode(self._ctx, self._batch)
            if rc == 0:
                elapsed = time.perf_counter() - began
                if not drafts:  # a drafting step is no plain step: it is measured below
                    self._paced(elapsed)
                break
            if rc != _KV_FULL or not self._make_room():
                rids = ", ".join(str(s.rid) for s in self._running)
                raise LlamaDecodeError(f"llama_decode returned {rc} (requests {rids})")
        deltas: list[Delta] = []
        for seq, n in zip(list(self._running), plan, strict=True):
            if seq.n_past < seq.n_prompt:
                self.prefill_tokens += min(seq.n_past + n, seq.n_prompt) - seq.n_past
            seq.n_past += n
        for seq, idx, fed in outputs:
            followers = seq.followers if seq.n_generated == 0 else []
            deltas.append(self._verify(seq, idx, fed) if fed[0] else self._draw(seq, idx))
            for f in followers:  # the prompt is in: the other choices start from it
                llama_cpp.llama_memory_seq_cp(self._memory, seq.slot, f.slot, -1, -1)
                f.n_past = seq.n_prompt
                f.out.n_cached = seq.out.n_cached
                self._running.append(f)
                deltas.append(self._draw(f, idx))
            seq.followers = []
        if drafts:  # what the drafted rows cost and yielded
            assert self._pacer is not None
            n_decoding = self._mix[0]
            self._draft_costs[n_decoding].observe(
                elapsed, self._pacer.decode_s(n_decoding), len(next(iter(drafts.values()))[0]),
                sum(d.n_tokens for d in deltas), n_decoding,
            )
        for seq in [s for s in self._running if s.out.finish is not None]:
            self._end(seq, keep_cache=True)
        return deltas

    def _drafts(self, plan: list[int]) -> dict[Choice, tuple[list[int], int]]:
        """Tokens fed this step after each decoding sequence's pending one, and how many of them
        are drafted (prompt lookup, see :mod:`.lookup`; the rest fill the row count all share),
        as many as make the most tokens a second at the measured costs. Only in a step that
        prefills nothing (a prompt's chunk is paced against plain decode steps), and none if a
        decoding sequence samples seeded (its rows are computed one way, see
        ``batching.share_budget``)."""
        limit = self.config.draft_tokens
        n_decoding, n_prefill, _ = self._mix
        if limit < 1 or n_prefill or self._pacer is None or n_decoding < 1:
            return {}
        plain_s = self._pacer.decode_s(n_decoding)
        decoding = [s for s in self._running if s.pending == 1]
        if plain_s is None or any(s.exact for s in decoding):
            return {}  # a plain step of as many streams is the measure of what drafting saves
        # A fed token is kept only if it is drawn, before max_tokens and the context's end.
        limit = min([limit, (self._n_batch - sum(plan)) // len(decoding)]
                    + [s.tokens_left(self._n_ctx) - 1 for s in decoding])
        proposals = []
        for seq in decoding:
            lookup = seq.draft = seq.draft or NgramDraft()
            proposals.append(lookup.propose(seq.tokens, limit))
        if not any(sure for _, sure in proposals):
            for seq in decoding:
                seq.draft.observe(0, 0)  # type: ignore[union-attr]
            return {}
        costs = self._draft_costs.setdefault(n_decoding, DraftCost(self.config.draft_tokens))
        fixed_s, per_row_s = costs.costs(plain_s)
        k = plan_drafts(
            [seq.draft.kept for seq in decoding], [sure for _, sure in proposals],  # type: ignore[union-attr]
            plain_s, fixed_s, per_row_s, min(limit, costs.cap),
        )
        if k == 0:
            for seq in decoding:
                seq.draft.observe(0, 0)  # type: ignore[union-attr]
            return {}
        return {seq: (tokens[:k], min(sure, k)) for seq, (tokens, sure) in zip(decoding, proposals, strict=True)}

    def _verify(self, seq: Choice, idx: int, fed: tuple[list[int], int]) -> Delta:
        """Draw the sequence's tokens from the ``idx``-th logits (its pending token's) and the
        rows of the tokens fed after it, in order, while each fed token is the one drawn before
        it (so its row's logits are those the plain path would compute); drop the KV of the
        rest. One delta for all the tokens drawn."""
        tokens, sure = fed
        assert seq.draft is not None
        delta = self._draw(seq, idx)
        kept = 0
        for token in tokens:
            if seq.out.finish is not None or seq.tokens[-1] != token:
                break
            seq.n_past += 1  # the fed token's KV is the drawn token's
            kept += 1
            delta = merge(delta, self._draw(seq, idx + kept))
        seq.draft.observe(sure, min(kept, sure))
        self.drafted_tokens += len(tokens)
        self.kept_tokens += kept
        if kept < len(tokens):
            llama_cpp.llama_memory_seq_rm(self._memory, seq.slot, seq.n_past, -1)
        return delta

    def _draw(self, seq: Choice, idx: int) -> Delta:
        """Draw the sequence's next token from the ``idx``-th logits and turn it into output."""
        out, ctx = seq.out, self._ctx
        assert seq.sampler is not None and self._tok is not None and ctx is not None
        logits = None
        if out.constraint is not None or out.gen.logprobs >= 0:
            ptr = llama_cpp.llama_get_logits_ith(ctx, idx)
            logits = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))
            if out.constraint is not None:
                out.constraint.apply(logits)  # in place: the native sampler reads these logits
        token = seq.sampler.sample(ctx, idx)
        seq.tokens.append(token)
        lp = None
        if logits is not None and out.gen.logprobs >= 0:
            lp = token_logprob(logits, token, out.gen.logprobs, self._tok)
        return out.accept(token, lp, at_limit=len(seq.tokens) >= self._n_ctx)

    def _fill_batch(
        self, plan: list[int], drafts: dict[Choice, tuple[list[int], int]]
    ) -> list[tuple[Choice, int, tuple[list[int], int]]]:
        """Write this step's tokens into the batch; return (sequence, output index, draft) for
        each sequence whose last pending token is in it (its logits are sampled), its drafted
        tokens after it, each with logits.

        ``plan`` is in admission order (who gets the budget); the tokens are listed in slot
        order, so each run of consecutive slots is one micro-batch (see :mod:`.batching`)."""
        batch = self._batch
        assert batch is not None
        outputs: list[tuple[Choice, int, tuple[list[int], int]]] = []
        token, pos, n_seq_id, seq_id, logits = (
            batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits,
        )
        i = 0
        for seq, n in sorted(zip(self._running, plan, strict=True), key=_by_slot):
            if not n:
                continue
            start, tokens, slot = seq.n_past, seq.tokens, seq.slot
            for j in range(n):
                token[i] = tokens[start + j]
                # llama_cpp types ``pos`` as an array of arrays; it is a flat int32 array.
                pos[i] = start + j  # type: ignore[call-overload]
                n_seq_id[i] = 1
                seq_id[i][0] = slot
                logits[i] = 0
                i += 1
            if start + n == len(tokens):
                logits[i - 1] = 1
                fed = drafts.get(seq, _NONE_FED)
                outputs.append((seq, i - 1, fed))
                for j, t in enumerate(fed[0], start + n):
                    token[i] = t
                    pos[i] = j  # type: ignore[call-overload]
                    n_seq_id[i] = 1
                    seq_id[i][0] = slot
                    logits[i] = 1
                    i += 1
        batch.n_tokens = i
        return outputs
