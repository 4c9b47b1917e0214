"""Continuous-batching bookkeeping, independent of the runtime that does the maths.

Two decisions a batched backend makes on every step live here, as plain Python that the fast
tests can check without a model:

- :class:`SlotTable`: which KV-cache sequence id ("slot") a new request runs in, and how much of
  its prompt is already in the cache. A finished request's slot keeps its KV as an idle cache
  entry; the next request that shares a prefix with it (the same system prompt, the next turn of
  a chat) reuses those positions instead of recomputing them, either in place or from a running
  slot (``llama_memory_seq_cp`` in a unified KV cache shares cells; in a split one it copies the
  donor's buffer, so only a long prefix is taken that way). Requests that arrive together on one
  long prefix do not all compute it: the first does, the others wait for it
  (:meth:`SlotTable.awaited`) and start from its KV. The first stops its prefill where the shared
  prefix ends, so all of them prefill the rest in one step and get their first tokens, and decode,
  in step with each other.
- :func:`share_budget`: how one step's token budget is split. Every decoding sequence feeds its
  one token first, so running streams never stall behind a long prompt; prompts are prefilled
  with what is left (chunked prefill), the shortest first.
- :class:`PrefillPacer`: how much prompt a step may take beside running streams. A step's time is
  every running stream's inter-token latency, and a prompt token costs about as much as a whole
  decode step's share of it (SmolLM2 on 2 threads: ~4 ms a prompt token, ~45 ms a step of 8
  streams, so a 512-token chunk stalled them ~2 s). Measured step by step, prompts get at most
  ``slowdown - 1`` (3) decode steps' worth of time per step on average, so streams slow down
  while a prompt comes in, they do not stop for it; one step may stall them longer (``stall_s``,
  500 ms) to take a short prompt whole or a long one in whole attention tiles, the time paid back
  by the steps after it.

Contiguous slots matter with per-sequence KV caches (llama.cpp's non-unified mode): one
``llama_decode`` is computed in micro-batches that each cover a run of consecutive sequence ids,
in the order the batch lists them, and each micro-batch is a pass over all the weights. On
SmolLM2 (2 threads) a step of 8 decoding sequences took 76 ms listed in slot order and 128 ms
listed in reverse; 4 sequences in slots 0-3 took 45 ms, in slots 0, 2, 4, 6 68 ms. So the backend
lists a step's tokens in slot order (:func:`slot_runs` counts the passes), and :class:`SlotTable`
places a request where it extends a run of running slots unless a cache entry elsewhere holds a
prefix long enough to pay for the extra pass (``RUN_COST`` tokens): with more slots than running
requests, a few cached template tokens must not scatter the batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from engine_proc.spec import DEFAULT_PREFILL_SLOWDOWN, DEFAULT_PREFILL_STALL_MS

# The least time a step beside decoding streams is given on average for prompts: one fast stream
# (10 ms a step) slowed by 4 leaves a prompt 30 ms a step, a few tokens; 50 ms gives it 40.
PREFILL_FLOOR_S = 0.050

_LCP_BLOCK = 64
# What starting a request where it opens a new run of running slots costs, in prompt tokens it
# would have to reuse to be worth it: every step it runs beside others pays one more pass over
# the weights (SmolLM2, 2 threads: ~8 ms a step, so ~1 s over a 128-token reply, against ~3 ms
# per prompt token computed). A few cached template tokens never split the batch.
RUN_COST = 256


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int | None = None) -> int:
    """Length of the longest common prefix of two token sequences (of ``b[:limit]``).

    Compares blocks of slices first (C-speed list equality), then finishes token by token, so a
    4k-token prompt against eight slots costs well under a millisecond.
    """
    n = min(len(a), len(b), len(b) if limit is None else limit)
    i = 0
    while i + _LCP_BLOCK <= n and a[i : i + _LCP_BLOCK] == b[i : i + _LCP_BLOCK]:
        i += _LCP_BLOCK
    while i < n and a[i] == b[i]:
        i += 1
    return i


def slot_runs(slots: Iterable[int]) -> int:
    """How many runs of consecutive ids ``slots`` make: the micro-batches a step over them
    costs with per-sequence KV caches, when its tokens are listed in slot order."""
    ids = set(slots)
    return sum(1 for s in ids if s - 1 not in ids)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a new request runs and what it starts with.

    ``donor`` is the slot whose first ``reuse`` KV positions the request starts from: ``slot``
    itself (keep the prefix in place, drop the rest), another slot (share its cells), or None
    (start empty).
    """

    slot: int
    donor: int | None
    reuse: int


class SlotTable:
    """Which slots run a request, which hold an idle cache entry, and which are empty."""

    def __init__(self, n_slots: int, share: bool = True, min_share: int = 1, min_wait: int = 64) -> None:
        """``share``: slots may start from a running slot's KV. Without it a prefix is only
        reused in place, from the slot's own idle cache entry. ``min_share``: the shortest
        prefix worth taking from a running slot (a unified KV cache shares cells for free; a
        split one copies the donor's whole buffer, worth it only for a long prefix).
        ``min_wait``: the fewest tokens a request waits to take from a sequence still
        prefilling them (see :meth:`awaited`)."""
        if n_slots < 1:
            raise ValueError("n_slots must be at least 1")
        self.n_slots = n_slots
        # How many may run at once (the runtime may measure fewer worth running together than
        # it has slots; the other slots still keep idle cache entries).
        self.max_running = n_slots
        self.share = share
        self.min_share = max(1, min_share)
        self.min_wait = max(self.min_share, min_wait)
        self._running: set[int] = set()
        # Idle entries that requests about to be placed will reuse (see :meth:`claim`).
        self._claimed: set[int] = set()
        # Idle slots -> the tokens their KV holds, least recently used first (dicts keep order).
        self._cache: dict[int, list[int]] = {}

    @property
    def running(self) -> int:
        return len(self._running)

    def has_free(self) -> bool:
        return self.free() > 0

    def free(self) -> int:
        """How many more requests may start now."""
        return max(0, min(self.n_slots, self.max_running) - len(self._running))

    def cached(self) -> Mapping[int, list[int]]:
        return self._cache

    def claim(self, prompts: Iterable[Sequence[int]]) -> None:
        """Requests about to be placed together: the idle entry each shares the longest prefix
        with (at least ``RUN_COST`` tokens) counts as running while any of them is placed, and is
        the last an empty slot is taken from. Placed one by one against the running slots alone,
        eight conversations' next turns (each slot holding its conversation, all sharing a long
        system prompt) went mostly to their neighbours' entries, which extend the first one's
        run, and recomputed their previous reply (~100 tokens each, ~2x the turn's prefill)."""
        self._claimed = set()
        for prompt in prompts:
            limit = len(prompt) - 1
            best = max(((min(common_prefix(prompt, kv), limit), slot) for slot, kv in self._cache.items()),
                       default=(0, -1))
            if best[0] >= RUN_COST:
                self._claimed.add(best[1])

    def place(
        self, prompt: Sequence[int], running_kv: Mapping[int, tuple[Sequence[int], int]]
    ) -> Placement:
        """Pick a slot for ``prompt`` and mark it running.

        ``running_kv`` maps each running slot to (tokens, n): its KV holds ``tokens[:n]`` now,
        so a request can share a prefix with a sequence still being generated. At least one
        prompt token is always left to compute: its logits give the first output token.
        """
        if not self.has_free():
            raise RuntimeError("no free slot")
        # Of equal scores the longer prefix, then the first listed (the least recently used entry).
        _, reuse, target, donor = max(self._options(prompt, running_kv), key=lambda o: (o[0], o[1]))
        self._cache.pop(target, None)
        self._running.add(target)
        return Placement(target, donor, reuse)

    def _options(
        self, prompt: Sequence[int], running_kv: Mapping[int, tuple[Sequence[int], int]]
    ) -> list[tuple[int, int, int, int | None]]:
        """Where ``prompt`` could start now, as (score, reuse, slot, donor): a reused token is
        worth one, a new run of running slots costs ``RUN_COST``; at most all but the last
        prompt token is reused."""
        limit = len(prompt) - 1
        free = self._free_slot()
        free_runs = self._new_runs(free)
        options: list[tuple[int, int, int, int | None]] = [(-RUN_COST * free_runs, 0, free, None)]
        for slot, kv in self._cache.items():  # reuse in place: nothing to share, the rest is dropped
            n = min(common_prefix(prompt, kv), limit)
            if n:
                options.append((n - RUN_COST * self._new_runs(slot), n, slot, slot))
        if self.share:  # from a running slot, into the free slot
            for slot, (kv, n_kv) in running_kv.items():
                n = min(common_prefix(prompt, kv, n_kv), limit)
                if n >= self.min_share:
                    options.append((n - RUN_COST * free_runs, n, free, slot))
        return options

    def awaited(
        self, prompt: Sequence[int], running_kv: Mapping[int, tuple[Sequence[int], int]]
    ) -> tuple[int, int] | None:
        """Whether ``prompt`` should wait to be placed, as (the running slot it waits on, the
        prefix length it will share from it), or None: a running sequence still prefilling
        shares a prefix with it at least ``min_wait`` tokens longer than any KV it could start
        from now (many conversations on one system prompt arriving together: one computes it,
        the rest start from its KV instead of all computing it side by side). The wait ends
        when that prefix is in (or the sequence is gone), so it is bounded by one prefill."""
        if not self.share or not self.has_free():
            return None
        limit = len(prompt) - 1
        now = max(reuse for _, reuse, _, _ in self._options(prompt, running_kv))
        best: tuple[int, int] | None = None
        for slot, (tokens, n) in running_kv.items():
            if n >= limit or n >= len(tokens) - 1:
                continue  # holds all it will share, or is decoding: nothing to wait for
            shared = common_prefix(prompt, tokens, limit)
            if n < shared and shared - now >= self.min_wait and (best is None or shared > best[1]):
                best = (slot, shared)
        return best

    def _new_runs(self, slot: int) -> int:
        """How many runs of running (or claimed) slots starting a request in ``slot`` adds (1, 0
        or -1)."""
        busy = self._running | self._claimed
        return slot_runs(busy | {slot}) - slot_runs(busy)

    def _free_slot(self) -> int:
        """An empty slot, else the least recently used idle entry's; of either, one that joins
        a run of running slots, then the lowest."""
        empty = [s for s in range(self.n_slots) if s not in self._running and s not in self._cache]
        if empty:
            return min(empty, key=self._new_runs)  # min() keeps the first (lowest) of equals
        pool = [s for s in self._cache if s not in self._claimed] or list(self._cache)
        return min(pool, key=self._new_runs)  # of equals, the least recently used

    def release(self, slot: int, kv: list[int] | None) -> None:
        """The request in ``slot`` ended; keep ``kv`` (the tokens its KV holds) as a cache entry,
        or nothing if the caller freed the slot's KV."""
        self._running.discard(slot)
        self._cache.pop(slot, None)
        if kv:
            self._cache[slot] = kv

    def evict(self) -> int | None:
        """Forget the least recently used idle entry; return its slot so its KV can be freed."""
        if not self._cache:
            return None
        slot = next(iter(self._cache))
        del self._cache[slot]
        return slot


# Prompts that start together with nobody decoding end together if they fit this many steps.
TOGETHER_STEPS = 4


def share_budget(
    pending: Sequence[int], budget: int, exact: Sequence[bool] = (), exact_chunk: int = 0
) -> list[int]:
    """Tokens each sequence feeds this step, given how many each has pending (in admission order).

    With no sequence decoding, nobody waits on the step but the prompts: they are levelled (each
    gets up to an equal share, what a short one leaves goes to the others), so prompts that start
    together end together, and then decode in step with each other instead of the first ones
    decoding, paced, while the rest are still prefilled (:class:`PrefillPacer`). When they do not
    all fit the step but do fit ``TOGETHER_STEPS``, each keeps its last two tokens (one left would
    count as decoding) for the step they all fit: eight conversations' next turns, 840 tokens in
    steps of 512, had four start decoding after the first step and the other four paced beside
    them over seven more, stalling them ~400 ms each; at 1.2k tokens, two decoding and six
    prompts paced beside them in chunks of ~10 tokens took 13 s, where 2.5 steps would do. A
    larger group (a long prompt that came with short ones) is levelled as it is: the short ones
    start decoding, and the long one is paced beside them.

    Otherwise decoding sequences (one pending token) always get it; prefilling sequences share what is
    left of ``budget``, the fewest tokens left first (of equals, the oldest): a short prompt
    behind a long one gets its first token in a step or two instead of after the whole long
    prefill, and the long one loses only that short prompt's tokens (shortest remaining work
    first minimises the mean time to first token). A step always makes progress if anything is
    pending.

    Sequences marked ``exact`` (seeded sampling) are computed the same way whatever runs beside
    them, because llama.cpp's results for a sequence's rows depend (in the second decimal of a
    logprob) on how many of its rows one decode computes: their prompt goes in chunks of exactly
    ``exact_chunk`` tokens (they wait for room rather than take less), and its last token alone
    in a later step, as decoding tokens are. (The backend also starts them without reusing a
    cached prefix, which was computed some other way.) The cost: one step of time to first token.
    """
    out = [1 if p == 1 else 0 for p in pending]
    left = max(budget - sum(out), 0)
    if not any(out) and not any(exact):
        return _together(pending, left)
    for i in sorted(range(len(pending)), key=pending.__getitem__):
        p = pending[i]
        if p > 1 and left > 0:
            if exact and exact[i]:
                chunk = min(p - 1, max(exact_chunk, 1))
                if chunk > left:
                    continue  # a shorter chunk would be computed differently: wait for room
                out[i] = chunk
            else:
                out[i] = min(p, left)
            left -= out[i]
    if not any(out) and pending:
        first = next(i for i, p in enumerate(pending) if p > 0)
        out[first] = min(pending[first], max(budget, 1))
    return out


class PrefillPacer:
    """How many prompt tokens a step takes beside decoding streams, from measured step times.

    On a CPU a prompt token costs about as much compute beside decoding streams as alone: pacing
    cannot hide it, only spread it. So the pacer keeps an account (``credit``, seconds): every step
    with streams decoding earns the prompts ``room``, what keeps the average step within
    ``max(slowdown * decode_s, floor_s)``; a step's prompt work is charged as measured (the step's
    time less a decode-only step's), and while the account is overdrawn steps take no prompt work,
    so streams keep at least ``1 / slowdown`` of their speed on average. What a step takes may go
    past ``room``, up to ``stall_s`` (or the slowdown's step, if longer) in one step, when that
    lets prompts in whole (one step to their first token instead of several, each paying a pass
    of its own over the weights; prompts that came together go in together, so the streams stall
    once for them and the new ones decode in step) or a long one in whole tiles:

    ``tile``: the rows from which the runtime computes a prompt's attention in tiles (llama.cpp on
    a CPU with flash attention: 64 query rows). Under it each row attends alone, which costs the
    more the longer the context (SmolLM2, 2 threads, a 1.2k-token prompt beside eight streams:
    7.0 ms a prompt token in chunks of 16, 5.2 in chunks of 64 tiled rows, 4.5 in chunks of 256).
    A prompt too long to take whole in one step goes in chunks of whole tiles when one fits the
    stall limit, else (a large model, whose tile would stall streams too long) in chunks sized to
    ``room``. ``shared``: rows of the chunk the runtime computes with the streams' micro-batch
    rather than the prompt's own (llama.cpp's equal split gives a prompt whose sequence id
    neighbours a decoding one a first row beside theirs), added to the tiles.

    Costs are moving averages of what :meth:`observe` is told: :meth:`decode_s`, a step of ``n``
    decoding streams alone, kept per ``n`` (one stream took 11 ms here, eight 50 ms: one average
    over both had sized the chunks beside five streams for an 11 ms step); ``per_token_s``, a
    prompt token in a step with no streams decoding; :meth:`token_s`, a prompt token beside
    decoding streams, tiled or not, as the last such steps took: that follows the prompt, whose
    tokens cost more the further in they are (each attends to all before it; chunks of 16 beside
    eight streams: 4.6 ms a token in the first 300 positions, 9-10 past 900). Until a cost has
    been seen the first prompt takes ``start_chunk``. ``slowdown`` 0 turns pacing off (the caller
    gives prompts the whole step, and the streams wait for each chunk, as in llama.cpp's own
    server).
    """

    ALPHA: Final = 0.25  # weight of the newest measurement
    # A prompt token in a chunk under the tile against one in a tiled chunk, until both are seen
    # (SmolLM2 beside eight streams: 1.35 over a 1.2k-token prompt; alone 1.3 early, 1.6 late).
    UNTILED: Final = 1.4

    def __init__(
        self, max_chunk: int, *, slowdown: float = DEFAULT_PREFILL_SLOWDOWN,
        stall_s: float = DEFAULT_PREFILL_STALL_MS / 1000, floor_s: float = PREFILL_FLOOR_S,
        min_chunk: int = 8, start_chunk: int = 64, tile: int = 0,
    ) -> None:
        if max_chunk < 1 or not (slowdown == 0.0 or slowdown >= 1.0):
            raise ValueError("max_chunk must be at least 1 and slowdown 0 (off) or at least 1.0")
        self.max_chunk = max_chunk
        self.slowdown = slowdown
        self.stall_s = stall_s
        self.floor_s = floor_s
        self.min_chunk = max(1, min(min_chunk, max_chunk))
        self.start_chunk = max(self.min_chunk, min(start_chunk, max_chunk))
        self.tile = tile
        self._decode: dict[int, float] = {}  # decoding streams -> a decode-only step's time
        self.per_token_s: float | None = None
        self._token_s: dict[bool, float] = {}  # tiled -> a prompt token beside decoding streams
        self.credit = 0.0

    def decode_s(self, n: int) -> float | None:
        """A decode-only step of ``n`` streams: as measured, else the nearest size measured,
        scaled by the streams' ratio (an overestimate above it, an underestimate below)."""
        if n in self._decode or not self._decode:
            return self._decode.get(n)
        near = min(self._decode, key=lambda m: (abs(m - n), -m))
        return self._decode[near] * n / near

    def token_s(self, tiled: bool) -> float | None:
        """A prompt token beside decoding streams, in a tiled chunk or not: as last measured, else
        from the other kind, else from a prompt token alone (whose chunks are mostly tiled)."""
        if not self.tile:
            tiled = False
        known = self._token_s.get(tiled)
        if known is not None:
            return known
        other = self._token_s.get(not tiled)
        factor = self.UNTILED if self.tile else 1.0
        if other is not None:
            return other / factor if tiled else other * factor
        if self.per_token_s is None:
            return None
        return self.per_token_s if tiled else self.per_token_s * factor

    def cost(self, tokens: int, shared: int = 0) -> float | None:
        """What a chunk of ``tokens`` prompt tokens adds to a step beside decoding streams."""
        token_s = self.token_s(bool(self.tile) and tokens - shared >= self.tile)
        return None if token_s is None else tokens * token_s

    def chunks(self, n_decoding: int, prompts: Sequence[tuple[int, int]], max_tokens: int | None = None) -> list[int]:
        """Prompt tokens for the next step beside ``n_decoding`` streams, for each prompt in the
        order they are served: (tokens pending, rows shared with the streams' micro-batch).
        At most ``max_tokens`` in all (default ``max_chunk``)."""
        out = [0] * len(prompts)
        limit = self.max_chunk if max_tokens is None else max(1, min(max_tokens, self.max_chunk))
        decode_s = self.decode_s(n_decoding)
        untiled_s = self.token_s(False)
        if decode_s is None or untiled_s is None:
            if prompts:  # nothing measured yet
                pending, shared = prompts[0]
                out[0] = min(pending, limit, self._tiles(self.start_chunk, shared))
            return out
        room = max(self.slowdown * decode_s, self.floor_s) - decode_s
        cap = max(self.stall_s, self.slowdown * decode_s) - decode_s
        if not prompts:
            self.credit = min(self.credit + room, 0.0)  # the streams catch up; nothing is banked
            return out
        self.credit = min(self.credit + room, room)
        if self.credit < 0:
            return out  # overdrawn: the streams catch up this step
        left = self.credit
        bound = max(cap, 1.25 * left)  # what the whole prompts of one step may add to it
        spent = 0.0
        for i, (pending, shared) in enumerate(prompts):
            whole = self.cost(pending, shared)
            assert whole is not None
            if pending <= limit and spent + whole <= bound:
                # Whole, beside the others that arrived with it: one longer gap for the streams
                # instead of one per prompt, and the new streams start decoding in step.
                out[i] = pending
                spent += whole
                limit -= pending
                continue
            if i == 0:  # more than a step may stall for: a chunk of it
                out[0] = self._partial(pending, shared, left, cap, limit)
            break
        return out

    def waits(self, n_decoding: int, steps_left: int, cost: float | None) -> bool:
        """Whether the prompts wait for the ``n_decoding`` streams to end, all within
        ``steps_left`` steps by their ``max_tokens``, instead of stalling them for ``cost`` (the
        cheapest prompt whole): when that wait costs the prompts no more than the stall would
        cost every stream, nor more than ``stall_s``. Streams that end together then start
        their next prompts together, while nobody decodes, and stay in step: closed-loop clients
        and conversations of equal turns stall each other once a round instead of once a
        prompt (eight chats: every turn of one had stalled the seven others' streams)."""
        decode_s = self.decode_s(n_decoding)
        if decode_s is None or cost is None:
            return False
        return steps_left * decode_s <= min(cost, self.stall_s)

    def _partial(self, pending: int, shared: int, left: float, cap: float, limit: int) -> int:
        """A chunk of a prompt that does not go in whole this step: whole tiles when one fits
        ``cap`` (as many as ``left`` pays for, at least one), else what ``left`` pays for."""
        tiled_s = self.token_s(True)
        if self.tile and tiled_s is not None and pending - shared > self.tile:
            per_tile = self.tile * tiled_s
            if shared * tiled_s + per_tile <= cap:
                k = max(1, int((left - shared * tiled_s) / per_tile))
                k = min(k, (limit - shared) // self.tile)
                # Leave the last chunk a whole tile too, or take all if that fits.
                while k > 1 and 0 < pending - shared - k * self.tile < self.tile + shared:
                    k -= 1
                if k >= 1:
                    return shared + k * self.tile
        untiled_s = self.token_s(False)
        assert untiled_s is not None
        tokens = max(self.min_chunk, int(left / untiled_s + 1e-6))
        if self.tile:  # under a tile: a longer chunk would be tiled, and was not worth it
            tokens = min(tokens, shared + self.tile - 1)
        return min(tokens, pending, limit)

    def _tiles(self, tokens: int, shared: int) -> int:
        """``tokens`` rounded to whole tiles of the prompt's own rows (at least one)."""
        if not self.tile:
            return tokens
        return shared + max(1, (tokens - shared) // self.tile) * self.tile

    def observe(self, seconds: float, n_decoding: int, n_prefill: int, tiled: bool = False) -> None:
        """A step took ``seconds`` for ``n_decoding`` streams' tokens and ``n_prefill`` prompt
        tokens (``tiled``: in a chunk of whole tiles)."""
        if n_prefill == 0:
            if n_decoding:
                self._decode[n_decoding] = self._mix(self._decode.get(n_decoding), seconds)
        elif n_decoding == 0:
            self.credit = 0.0  # nobody waited on it
            if n_prefill >= self.min_chunk:  # a few tokens' time is mostly fixed costs and noise
                self.per_token_s = self._mix(self.per_token_s, seconds / n_prefill)
        elif (decode_s := self.decode_s(n_decoding)) is not None:
            spent = max(seconds - decode_s, 0.0)
            self.credit -= spent
            kind = tiled and bool(self.tile)
            self._token_s[kind] = self._mix(self._token_s.get(kind), max(spent, 1e-4 * n_prefill) / n_prefill)

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.ALPHA * (new - old)


def _together(pending: Sequence[int], budget: int) -> list[int]:
    """:func:`_level`, except that prompts which do not all fit this step, but do fit
    ``TOGETHER_STEPS`` steps, keep two tokens each back until they all fit one (see
    :func:`share_budget`)."""
    total, budget = sum(pending), max(budget, 1)
    if budget < total <= TOGETHER_STEPS * budget:
        return _level([max(p - 2, 0) for p in pending], budget)
    return _level(pending, budget)


def _level(pending: Sequence[int], budget: int) -> list[int]:
    """Split ``budget`` over ``pending`` as evenly as it goes (water-filling): every one gets
    ``min(p, share)``, the share as large as the budget allows; leftover units go to the oldest."""
    out = [0] * len(pending)
    left = max(budget, 1)
    active = [i for i, p in enumerate(pending) if p > 0]
    while active and left > 0:
        share = max(left // len(active), 1)
        for i in list(active):
            n = min(pending[i] - out[i], share, left)
            out[i] += n
            left -= n
            if out[i] == pending[i]:
                active.remove(i)
            if left == 0:
                break
    return out
