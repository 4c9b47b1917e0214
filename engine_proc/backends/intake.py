"""A generation request turned into the choices a runtime runs, the same way for every backend.

:func:`admit` checks what a runtime cannot run (its kind, ``max_tokens``, ``n``, logprobs,
``logit_bias`` ids, a prompt longer than the context), builds the prompt tokens (the chat
template through :class:`~engine_proc.tokenizer.Tokenizer`, a completion prompt, or token ids)
and returns the request's :class:`Choice` es: the leader, which prefills, holding its followers
(``n > 1``), which start from the leader's prompt once it is in. A backend only schedules and
computes them; refusals are :class:`~engine_proc.backends.base.RequestRejected`.
"""

from __future__ import annotations

import array
from collections import deque
from typing import Any

import msgspec

from engine_proc.backends.base import Backend, BackendConfig, RequestRejected
from engine_proc.backends.batching import PrefillPacer, SlotTable, share_budget
from engine_proc.backends.lookup import NgramDraft
from engine_proc.grammar import GrammarError
from engine_proc.output import MAX_TOP_LOGPROBS, ChoiceOutput
from engine_proc.tokenizer import TemplateError, Tokenizer
from ipc.records import Kind, SamplingParams, Submit


class Choice:
    """A choice of a request: its slot (KV sequence), tokens so far, sampler and output.

    ``tokens[:n_past]`` are in the KV cache; ``tokens[n_past:]`` are still to be fed (the prompt
    while prefilling, then the one token sampled last). A request with ``n > 1`` runs as one
    choice that prefills (the leader) and ``followers`` that wait meanwhile; when the prompt is
    in, each follower takes a copy of the leader's KV and draws its first token from the same
    logits: one prefill for all the choices. ``sampler`` and ``cache`` belong to the runtime.
    """

    __slots__ = (
        "awaited", "cache", "draft", "exact", "followers", "n_past", "n_prompt", "out", "params", "rid", "sampler",
        "slot", "tokens",
    )

    def __init__(self, rid: int, params: SamplingParams, prompt: list[int], out: ChoiceOutput) -> None:
        self.rid = rid
        self.params = params
        self.tokens: list[int] = prompt  # prompt + generated
        self.n_prompt = len(prompt)
        self.n_past = 0
        self.slot = -1
        self.sampler: Any = None
        self.cache: Any = None
        self.out = out
        self.followers: list[Choice] = []
        self.draft: NgramDraft | None = None  # prompt-lookup drafting state, when the runtime drafts
        # The length of its prompt's prefix that requests waiting to share it will start from
        # (see SlotTable.awaited; 0: none): its prefill stops there, for a step, so theirs and
        # the rest of its own go in together.
        self.awaited = 0
        # Seeded sampling: its first logits are computed alone, cached prefix or not (see
        # batching.share_budget), so the seed reproduces the reply.
        self.exact = params.seed is not None and params.temperature > 0

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.n_prompt

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.n_past

    @property
    def to_feed(self) -> int:
        """What it may feed this step: :attr:`pending`, up to the end of an awaited prefix."""
        stop = self.awaited - self.n_past
        return stop if 1 < stop < self.pending else self.pending

    def tokens_left(self, n_ctx: int) -> int:
        """Tokens it may still draw: to ``max_tokens`` or the context's end, whichever is first."""
        return min(self.params.max_tokens - self.n_generated, n_ctx - len(self.tokens))


class ChoiceBackend(Backend):
    """What a batched backend keeps of its requests, whatever computes them: choices waiting
    (FIFO) and running (in admission order), the slot table, and what follows from them
    (submit, has_work, occupancy, held KV). A runtime sets ``_tok``, ``_n_ctx`` and
    ``_max_piece`` in ``load`` and implements the rest."""

    def __init__(self, config: BackendConfig, share: bool, min_share: int = 1) -> None:
        super().__init__(config)
        self._tok: Tokenizer | None = None
        self._n_ctx = 0
        self._max_piece = 1
        self._slots = SlotTable(max(1, config.max_batch), share=share, min_share=min_share)
        self._waiting: deque[Choice] = deque()
        self._running: list[Choice] = []  # in admission order
        self._n_batch = 0  # a step's most tokens; set by the runtime's load
        self._pacer: PrefillPacer | None = None
        # The rows from which the runtime computes a prompt's attention in tiles (0: none).
        self._prefill_tile = 0
        self._mix = (0, 0, False)  # the planned step's decoding streams, prompt tokens, tiled

    def _plan(self) -> list[int]:
        """This step's tokens per running choice: decoding streams one each; prompts what
        :class:`PrefillPacer` gives them beside the streams (the fewest tokens left first), or,
        with none decoding (or pacing off), the step's budget (see :func:`share_budget`); none when
        the streams decoding all end within a few steps (see :meth:`PrefillPacer.waits`). A prompt
        that requests wait to share goes no further than the prefix they wait for (see
        ``Choice.awaited``). A seeded prompt's fixed-size chunks (see ``share_budget``) are not
        paced: it would wait for room forever."""
        if self._pacer is None or self._pacer.max_chunk != self._n_batch:
            self._pacer = PrefillPacer(
                max(self._n_batch, 1), slowdown=self.config.prefill_slowdown,
                stall_s=self.config.prefill_stall_ms / 1000, tile=self._prefill_tile,
            )
        pacer = self._pacer
        pending = [s.to_feed for s in self._running]
        exact = [s.exact for s in self._running]
        n_decoding = pending.count(1)
        if n_decoding == 0 or pacer.slowdown == 0.0 or any(e and p > 1 for e, p in zip(exact, pending, strict=True)):
            plan = share_budget(pending, self._n_batch, exact, max(self._n_batch - self._slots.n_slots, 1))
            self._mix = (n_decoding, sum(plan) - n_decoding, False)
            return plan
        plan = [1 if p == 1 else 0 for p in pending]
        order = sorted((i for i, p in enumerate(pending) if p > 1), key=pending.__getitem__)
        decoding = {s.slot for s in self._running if s.pending == 1}
        shared = [self._shares_first(self._running[i].slot, decoding) for i in order]
        if order and pacer.waits(n_decoding, max(s.tokens_left(self._n_ctx) for s in self._running if s.pending == 1),
                                 pacer.cost(pending[order[0]], shared[0])):
            self._mix = (n_decoding, 0, False)
            return plan
        chunks = pacer.chunks(n_decoding, [(pending[i], sh) for i, sh in zip(order, shared, strict=True)],
                              self._n_batch - n_decoding)
        tiled = False
        for i, sh, chunk in zip(order, shared, chunks, strict=True):
            plan[i] = chunk
            tiled = tiled or (pacer.tile > 0 and chunk - sh >= pacer.tile)
        self._mix = (n_decoding, sum(chunks), tiled)
        return plan

    def _shares_first(self, slot: int, decoding: set[int]) -> int:
        """Rows of a prompt's chunk that the runtime computes in the decoding streams'
        micro-batch rather than the prompt's own (0 where it has no tiles to keep whole)."""
        return 0

    def _paced(self, seconds: float) -> None:
        """The step planned last took ``seconds`` to compute."""
        if self._pacer is not None:
            self._pacer.observe(seconds, *self._mix)

    def submit(self, request: Submit) -> None:
        assert self._tok is not None, "load() first"
        self._waiting.append(
            admit(
                request, self._tok, n_ctx=self._n_ctx, max_choices=self._slots.max_running,
                max_piece=self._max_piece, trusted=self.trusted_messages(),
            )
        )

    def has_work(self) -> bool:
        return bool(self._running) or bool(self._waiting)

    def occupancy(self) -> tuple[int, int]:
        parked = sum(len(s.followers) for s in self._running)
        return len(self._running) + parked, sum(1 + len(s.followers) for s in self._waiting)

    def held_tokens(self) -> int:
        """KV positions the running choices hold (a leader's are its followers' too, soon)."""
        return sum(s.n_past * (1 + len(s.followers)) for s in self._running)

    def cancelled_prefills(self) -> list[Choice]:
        """Running choices still prefilling whose request the front cancelled: the backend
        drops them now (the next prefill chunk would be wasted) and reports them."""
        gone = [s for s in self._running if s.pending > 1 and self.cancelled(s.rid)]
        self.dropped += [rid for rid in dict.fromkeys(s.rid for s in gone) if rid not in self.dropped]
        return gone


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Each choice draws its own stream: a request's seed, offset by the choice's index."""
    if index == 0 or params.seed is None:
        return params
    return msgspec.structs.replace(params, seed=params.seed + index)


def admit(
    request: Submit, tok: Tokenizer, *, n_ctx: int, max_choices: int, max_piece: int, trusted: bool
) -> Choice:
    """The request's leader choice (its followers in ``followers``), or RequestRejected."""
    params, gen = request.params, request.gen
    n_vocab = tok.n_vocab
    if request.kind is not Kind.generate:
        raise RequestRejected("invalid_request", "this model is loaded for generation, not embeddings", "model")
    if params.max_tokens < 1:
        raise RequestRejected("invalid_request", "max_tokens must be at least 1", "max_tokens")
    if not 1 <= gen.n <= max_choices:
        raise RequestRejected(
            "invalid_request", f"n must be between 1 and {max_choices} (this model's max_batch), got {gen.n}", "n",
        )
    if gen.logprobs > MAX_TOP_LOGPROBS:
        raise RequestRejected("invalid_request", f"at most {MAX_TOP_LOGPROBS} top logprobs", "top_logprobs")
    bad = next((t for t, _ in gen.logit_bias if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise RequestRejected(
            "invalid_request", f"logit_bias: token id {bad} is outside the vocabulary (size {n_vocab})", "logit_bias",
        )
    check_size(request, n_ctx, max_piece)
    echo = ""
    if request.messages is not None:
        what = "messages"
        try:
            prompt = tok.chat_tokens(request.messages, gen, trusted)
        except TemplateError as e:
            raise RequestRejected("invalid_request", str(e), "messages") from e
    elif request.prompt is not None:
        prompt, what = tok.completion_tokens(request.prompt), "prompt"
        echo = request.prompt if gen.echo else ""
    elif request.prompt_ids is not None:
        prompt, what = token_ids(request.prompt_ids, n_vocab), "prompt"
        echo = tok.detokenize(prompt) if gen.echo else ""
    else:
        raise RequestRejected("invalid_request", "request has neither messages nor prompt")
    if not prompt:
        raise RequestRejected("invalid_request", "prompt is empty", "prompt")
    if len(prompt) >= n_ctx:
        raise RequestRejected(
            "context_length_exceeded",
            f"This model's maximum context length is {n_ctx} tokens. However, your "
            f"{what} resulted in {len(prompt)} tokens. Please reduce the length of the {what}.",
            what,
        )
    try:
        choices = [
            Choice(
                request.rid,
                p := choice_params(params, i),
                list(prompt),
                ChoiceOutput(request.rid, i, p, gen, tok, len(prompt), echo),
            )
            for i in range(gen.n)
        ]
    except GrammarError as e:
        raise RequestRejected("invalid_request", f"the grammar cannot be used: {e}") from e
    leader = choices[0]
    leader.followers = choices[1:]
    return leader


def check_size(request: Submit, n_ctx: int, max_piece: int) -> None:
    """Refuse, before tokenizing, a prompt that cannot fit: no token is longer than the
    vocabulary's longest piece, so text of more than n_ctx such pieces is over for sure.
    (Tokenizing megabytes only to count them stalled the engine past its heartbeat.)"""
    if request.prompt_ids is not None:
        n, unit, what = len(request.prompt_ids) // 4, "tokens", "prompt"
        limit = n_ctx
    else:
        if request.messages is not None:
            n, what = sum(len(m.content.encode()) for m in request.messages), "messages"
        else:
            n, what = len((request.prompt or "").encode()), "prompt"
        unit, limit = "bytes", n_ctx * max_piece
    if n > limit:
        raise RequestRejected(
            "context_length_exceeded",
            f"This model's maximum context length is {n_ctx} tokens. However, your {what} "
            f"has {n} {unit}, more than {n_ctx} tokens can hold. Please reduce the length of the {what}.",
            what,
        )


def token_ids(packed: bytes, n_vocab: int) -> list[int]:
    ids = array.array("i")
    ids.frombytes(packed)
    bad = next((t for t in ids if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise RequestRejected(
            "invalid_request", f"token id {bad} is outside the model's vocabulary (size {n_vocab})", "prompt"
        )
    return ids.tolist()
