"""Continuous-batching bookkeeping: slot placement with prefix reuse, and the step budget."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine_proc.backends.batching import (
    Placement,
    SlotTable,
    common_prefix,
    PrefillPacer,
    share_budget,
    slot_runs,
)


@given(st.lists(st.integers(0, 3), max_size=300), st.lists(st.integers(0, 3), max_size=300))
def test_common_prefix_matches_the_obvious_loop(a: list[int], b: list[int]) -> None:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    assert common_prefix(a, b) == n


def test_common_prefix_respects_the_limit_on_b() -> None:
    a = list(range(200))
    assert common_prefix(a, a, 130) == 130
    assert common_prefix(a, a + [7], 0) == 0


def test_empty_table_places_in_slot_zero_with_nothing_to_reuse() -> None:
    t = SlotTable(2)
    assert t.place([1, 2, 3], {}) == Placement(0, None, 0)
    assert t.place([1, 2, 3], {}) == Placement(1, None, 0)
    assert not t.has_free()


def test_a_finished_request_leaves_a_cache_entry_reused_in_place() -> None:
    t = SlotTable(4)
    system = list(range(100))
    first = t.place(system + [500, 501], {})
    t.release(first.slot, system + [500, 501, 9, 9])
    p = t.place(system + [600], {})
    assert p == Placement(first.slot, first.slot, 100)
    assert t.cached() == {}


def test_reuse_always_leaves_one_prompt_token_to_compute() -> None:
    t = SlotTable(1)
    t.release(t.place([1, 2, 3], {}).slot, [1, 2, 3, 4])
    assert t.place([1, 2, 3], {}).reuse == 2


def test_a_running_sequence_shares_its_prefix_with_a_new_slot() -> None:
    t = SlotTable(3)
    system = list(range(50))
    running = t.place(system + [1], {})
    # The running sequence's KV holds 40 tokens so far (it is still prefilling).
    p = t.place(system + [2], {running.slot: (system + [1], 40)})
    assert p.slot != running.slot and p.donor == running.slot and p.reuse == 40


def test_best_prefix_wins_and_a_miss_takes_an_empty_slot_before_evicting_a_cache() -> None:
    t = SlotTable(3)
    a, b = [1] * 10, [2] * 10
    sa, sb = t.place(a, {}).slot, t.place(b, {}).slot
    t.release(sa, a)
    t.release(sb, b)
    miss = t.place([3] * 10, {})
    assert miss.donor is None and miss.slot not in (sa, sb)
    assert set(t.cached()) == {sa, sb}
    # No empty slot left: a second miss takes the least recently used entry (a's).
    t.release(miss.slot, None)
    hit = t.place(b + [5], {})
    assert hit == Placement(sb, sb, 10)
    miss2 = t.place([4] * 10, {})
    assert miss2.slot in (sa, miss.slot) and miss2.donor is None


def test_evict_goes_least_recently_used_first() -> None:
    t = SlotTable(3)
    slots = [t.place([i], {}).slot for i in range(3)]
    for s in slots:
        t.release(s, [s, s])
    assert [t.evict(), t.evict(), t.evict(), t.evict()] == [slots[0], slots[1], slots[2], None]


def test_decoders_always_get_their_token_and_prefill_shares_the_rest() -> None:
    assert share_budget([1, 1, 1], 2) == [1, 1, 1]  # never starve a running stream
    assert share_budget([1, 900, 1, 300], 512) == [1, 210, 1, 300]  # the shorter prompt first
    assert share_budget([300, 300, 1], 512) == [300, 211, 1]  # of equals, the older
    assert share_budget([300, 300, 1], 512, [True, False, False], 256) == [256, 255, 1]  # fixed chunks
    assert share_budget([100, 300, 1], 512, [True, False, False], 256) == [99, 300, 1]  # its last token waits
    assert share_budget([1, 300, 400], 512, [False, False, True], 256) == [1, 300, 0]  # no room: it waits
    assert share_budget([2], 512, [True], 256) == [1]
    assert share_budget([], 512) == []


def test_prompts_with_nobody_decoding_are_levelled_so_they_end_in_one_step() -> None:
    assert share_budget([90] * 8, 512) == [64] * 8
    assert share_budget([26] * 8, 512) == [26] * 8  # all end together: they decode in step
    assert share_budget([2500, 90, 90], 512) == [332, 90, 90]  # what the short ones leave
    assert share_budget([5, 5, 5], 2) == [1, 1, 0]  # a unit each to the oldest
    assert sum(share_budget([700, 300, 9], 1024)) == 1009


def test_prompts_that_fit_a_few_steps_but_not_one_all_end_in_the_same_step() -> None:
    from engine_proc.backends.batching import TOGETHER_STEPS

    # A chat turn: eight new messages, four of them within the levelled share of 64.
    pending = [60, 50, 64, 63, 140, 130, 160, 150]
    steps = []
    while any(pending):
        plan = share_budget(pending, 512)
        assert 0 < sum(plan) <= 512
        steps.append([p == n for p, n in zip(pending, plan, strict=True)])  # who ends in this step
        pending = [p - n for p, n in zip(pending, plan, strict=True)]
        assert all(p != 1 for p in pending)  # one token left would count as decoding
    assert steps == [[False] * 8, [True] * 8]
    # Up to TOGETHER_STEPS steps: a long prompt that came with short ones holds them back too.
    pending = [1500, 90, 90]
    ends = []
    while any(pending):
        plan = share_budget(pending, 512)
        ends.append([p == n for p, n in zip(pending, plan, strict=True)])
        pending = [p - n for p, n in zip(pending, plan, strict=True)]
    assert len(ends) == TOGETHER_STEPS and ends[-1] == [True] * 3 and not any(map(any, ends[:-1]))
    assert share_budget([2, 2, 700], 512) == [0, 0, 512]


@given(st.lists(st.tuples(st.integers(1, 2000), st.booleans()), min_size=1, max_size=16), st.integers(1, 1024))
def test_budget_is_respected_and_a_step_always_progresses(seqs: list[tuple[int, bool]], budget: int) -> None:
    pending = [p for p, _ in seqs]
    exact = [e for _, e in seqs]
    out = share_budget(pending, budget, exact, max(budget // 2, 1))
    assert all(n < p for n, p, e in zip(out, pending, exact, strict=True) if e and p > 1)
    decoders = sum(1 for p in pending if p == 1)
    assert all(0 <= n <= p for n, p in zip(out, pending, strict=True))
    assert sum(out) <= max(budget, decoders)
    assert any(out)


def test_without_sharing_a_prefix_is_only_reused_in_place() -> None:
    t = SlotTable(3, share=False)
    system = list(range(50))
    running = t.place(system + [1], {})
    p = t.place(system + [2], {running.slot: (system + [1], 51)})
    assert p.donor is None and p.reuse == 0
    t.release(p.slot, system + [2, 3])
    assert t.place(system + [4], {running.slot: (system + [1], 51)}) == Placement(p.slot, p.slot, 50)


def test_slot_runs_counts_runs_of_consecutive_ids() -> None:
    assert slot_runs([]) == 0
    assert slot_runs([3]) == 1
    assert slot_runs([0, 1, 2, 3]) == 1
    assert slot_runs([3, 0, 2, 1]) == 1  # order does not matter: the batch is listed by slot
    assert slot_runs([0, 2, 4, 6]) == 4
    assert slot_runs([0, 1, 5, 6, 7]) == 2


def test_a_miss_takes_an_empty_slot_that_joins_the_running_ones() -> None:
    t = SlotTable(6)
    for _ in range(3):
        t.place([9], {})
    t.release(0, None)
    t.release(1, None)  # running: 2; empty: 0, 1, 3, 4, 5
    assert t.place([7], {}).slot == 1  # next to 2, and lower than 3
    assert t.place([8], {}).slot == 0
    assert t.place([6], {}).slot == 3


def test_of_equal_prefixes_the_entry_next_to_running_slots_is_reused() -> None:
    t = SlotTable(5, share=False)
    system = list(range(40))
    for i in range(5):
        t.place(system + [100 + i], {})
    # Idle entries in 4 (least recently used) and 2; slots 0, 1, 3 run.
    t.release(4, system + [104])
    t.release(2, system + [102])
    p = t.place(system + [200], {})
    assert p == Placement(2, 2, 40)  # fills the gap between 1 and 3, rather than the LRU entry
    # A longer prefix still wins wherever it is.
    t.release(2, system + [200])
    t.place([5], {})  # takes 2 again (the only other idle entry is 4, not adjacent to more)
    assert t.place(system + [104, 1], {}) == Placement(4, 4, 41)


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 7)), max_size=60))
def test_misses_never_split_runs_when_a_joining_slot_is_empty(ops: list[tuple[bool, int]]) -> None:
    t = SlotTable(8)
    running: set[int] = set()
    for is_place, k in ops:
        if is_place and t.has_free():
            joining = {s for s in range(8) if s not in running and (s - 1 in running or s + 1 in running)}
            slot = t.place([k], {}).slot  # no entry is ever kept: every place is a miss
            assert not joining or slot in joining
            running.add(slot)
        elif running:
            slot = sorted(running)[k % len(running)]
            t.release(slot, None)
            running.discard(slot)


def test_a_short_prefix_is_not_taken_from_a_running_slot_below_min_share() -> None:
    """A split KV cache copies the donor's whole buffer: only a long prefix is worth it."""
    t = SlotTable(3, min_share=64)
    system = list(range(100))
    running = t.place(system + [1], {})
    kv = {running.slot: (system + [1], 101)}
    assert t.place(system[:40] + [2], kv) == Placement(1, None, 0)  # 40 shared: computed afresh
    assert t.place(system + [3], kv) == Placement(2, running.slot, 100)


def test_requests_on_a_prefix_being_prefilled_wait_for_it_then_share_it() -> None:
    t = SlotTable(4, min_share=64, min_wait=64)
    system = list(range(300))
    leader = t.place(system + [1, 2], {})
    follower = system + [7, 8]
    # The leader has computed 100 of the 300 shared tokens: the follower would compute the
    # other 200 itself beside it, so it waits.
    assert t.awaited(follower, {leader.slot: (system + [1, 2], 100)}) == (leader.slot, 300)
    # Once the shared prefix is in, it no longer waits, and starts from the leader's KV.
    kv = {leader.slot: (system + [1, 2], 300)}
    assert t.awaited(follower, kv) is None
    assert t.place(follower, kv) == Placement(1, leader.slot, 300)


def test_no_wait_for_a_short_gain_a_decoding_sequence_or_without_sharing() -> None:
    t = SlotTable(4, min_share=1, min_wait=64)
    system = list(range(300))
    leader = t.place(system + [1], {})
    assert t.awaited(system[:50] + [9], {leader.slot: (system + [1], 10)}) is None  # gain 40 < 64
    assert t.awaited([9] * 400, {leader.slot: (system + [1], 10)}) is None  # nothing shared
    decoding = system + [1, 5, 6]
    assert t.awaited(system + [2], {leader.slot: (decoding, len(decoding) - 1)}) is None
    # An idle entry already holding the prefix: nothing to gain by waiting.
    t.release(t.place(system + [3], {}).slot, system + [3])
    assert t.awaited(system + [4], {leader.slot: (system + [1], 10)}) is None
    assert SlotTable(4, share=False).awaited(system + [2], {0: (system + [1], 10)}) is None


def test_a_short_cached_prefix_does_not_scatter_the_batch_a_long_one_may() -> None:
    from engine_proc.backends.batching import RUN_COST

    t = SlotTable(8)
    header = [1, 2, 3, 4, 5]  # the chat template's first tokens, in every cache entry
    for i in range(3):
        t.place(header + [20 + i], {})  # 0, 1, 2 run
    t._cache[6] = header + [77]  # an idle entry away from the run
    # Its 5 tokens lose to an empty slot that extends the run.
    assert t.place(header + [42], {}) == Placement(3, None, 0)
    t.release(3, None)
    # A prefix longer than the run's cost is worth the extra pass.
    system = list(range(100, 100 + RUN_COST + 50))
    t._cache[6] = system + [1]
    assert t.place(system + [2], {}) == Placement(6, 6, len(system))


def _warm(pacer: PrefillPacer, decode_s: float = 0.050, token_s: float = 0.004, n: int = 8) -> None:
    pacer.observe(250 * token_s, 0, 250)  # a prompt alone
    for _ in range(30):
        pacer.observe(decode_s, n, 0)  # n streams decoding alone


def _run(pacer: PrefillPacer, prompt: int, token_s: float, decode_s: float = 0.050, n: int = 8,
         shared: int = 0, tiled_s: float | None = None) -> list[tuple[int, float]]:
    """Steps beside ``n`` streams until ``prompt`` tokens are in, each as (chunk, seconds), a
    prompt token costing ``token_s`` (``tiled_s`` in chunks of whole tiles)."""
    steps = []
    while prompt > 0:
        [chunk] = pacer.chunks(n, [(prompt, shared)])
        tiled = bool(pacer.tile) and chunk - shared >= pacer.tile
        seconds = decode_s + chunk * (tiled_s if tiled and tiled_s else token_s)
        pacer.observe(seconds, n, chunk, tiled)
        steps.append((chunk, seconds))
        prompt -= chunk
        assert len(steps) < 10_000
    return steps


def test_prefill_pacer_keeps_streams_at_their_slowdown_on_average() -> None:
    pacer = PrefillPacer(512, slowdown=4.0, stall_s=0.05, min_chunk=8, start_chunk=64)
    assert pacer.chunks(8, [(1000, 0)]) == [64]  # nothing measured yet: the start chunk
    pacer = PrefillPacer(512, slowdown=4.0, stall_s=0.05, min_chunk=8, start_chunk=64)
    _warm(pacer)
    steps = _run(pacer, 2000, token_s=0.006)  # slower than a prompt token alone (4 ms): seen, followed
    assert steps[0][0] == 37  # (200 - 50 ms) / 4 ms: the cost of a token alone, until one beside them is seen
    assert max(s for _, s in steps[1:]) <= 4 * 0.050 * 1.15  # then no step stalls the streams much past 4x
    assert sum(s for _, s in steps) / len(steps) == pytest.approx(4 * 0.050, rel=0.1)
    assert pacer.token_s(False) == pytest.approx(0.006, rel=0.01)
    assert [c for c, _ in steps[-5:-1]] == [25] * 4  # (200 - 50 ms) / 6 ms


def test_prefill_pacer_follows_a_prompt_whose_tokens_cost_more_as_it_goes() -> None:
    """The cost of a prompt token grows with its position (attention over all before it): the
    chunks shrink with it, and no step runs away (a fixed cost that absorbed the growth had fed
    back into larger chunks)."""
    pacer = PrefillPacer(512, slowdown=4.0, stall_s=0.05)
    _warm(pacer, token_s=0.004)
    done, steps = 0, []
    while done < 1200:
        [chunk] = pacer.chunks(8, [(1200 - done, 0)])
        seconds = 0.050 + chunk * 0.004 * (1 + (done + chunk / 2) / 600)  # 3x the cost at 1200 tokens in
        pacer.observe(seconds, 8, chunk)
        steps.append((chunk, seconds))
        done += chunk
    assert max(s for _, s in steps[3:]) <= 0.200 * 1.25
    assert steps[5][0] > steps[-3][0]
    assert sum(s for _, s in steps) / len(steps) == pytest.approx(0.200, rel=0.1)


def test_prefill_pacer_lets_prompts_wait_for_streams_about_to_end() -> None:
    pacer = PrefillPacer(512, slowdown=4.0, stall_s=0.5)
    assert not pacer.waits(8, 1, 0.2)  # nothing measured: no wait
    _warm(pacer)  # eight streams decode a step in 50 ms
    assert pacer.waits(8, 1, 0.2)
    assert pacer.waits(8, 4, 0.2)  # 200 ms for the prompt instead of 200 ms for every stream
    assert not pacer.waits(8, 5, 0.2)
    assert pacer.waits(8, 10, 2.0)  # a long prompt waits no longer than the stall limit
    assert not pacer.waits(8, 11, 2.0)
    assert not pacer.waits(8, 1, None)


def test_prefill_pacer_takes_a_prompt_whole_within_the_stall_limit_then_lets_streams_catch_up() -> None:
    pacer = PrefillPacer(512, slowdown=4.0, stall_s=0.5)
    _warm(pacer)
    [whole] = pacer.chunks(8, [(100, 0)])
    assert whole == 100  # 100 x 4 ms: over a step's room (150 ms), within 500 ms
    pacer.observe(0.050 + 100 * 0.004, 8, 100)
    assert pacer.credit == pytest.approx(0.150 - 0.400)
    assert pacer.chunks(8, [(300, 0)]) == [0]  # the streams catch up: -250 + 150 ms
    assert pacer.chunks(8, [(300, 0)]) != [0]  # +50 ms: the next prompt goes on
    # Prompts that came together go in together, as long as the stall limit holds (3 x 160 ms
    # would be over 500 - 50 ms).
    pacer = PrefillPacer(512, slowdown=4.0, stall_s=0.5)
    _warm(pacer)
    assert pacer.chunks(8, [(40, 0), (40, 0), (40, 0)]) == [40, 40, 0]
    # Shortest first: whole prompts while the step's room lasts, then no partial chunk after them.
    pacer = PrefillPacer(512, slowdown=4.0, stall_s=0.05)
    _warm(pacer)
    assert pacer.chunks(8, [(10, 0), (20, 0), (300, 0)]) == [10, 20, 0]
    # Nothing waiting: nothing is banked for later, a debt is still paid.
    pacer.credit = -0.1
    pacer.chunks(8, [])
    assert pacer.credit == pytest.approx(0.0)
    pacer.chunks(8, [])
    assert pacer.credit == 0.0


def test_prefill_pacer_takes_whole_tiles_beside_streams_when_one_fits_the_stall_limit() -> None:
    pacer = PrefillPacer(512, slowdown=4.0, stall_s=0.5, tile=64)
    _warm(pacer)
    assert pacer.token_s(True) == pytest.approx(0.004) and pacer.token_s(False) == pytest.approx(0.004 * 1.4)
    # A tile of the prompt's own rows, plus the one row it gives the streams' micro-batch.
    steps = _run(pacer, 1000, token_s=0.0056, tiled_s=0.004, shared=1)
    chunks = [c for c, _ in steps]
    fed = [c for c in chunks if c]
    assert all(c == 65 for c in fed[:-1]) and fed[-1] >= 65 and sum(fed) == 1000
    assert max(s for _, s in steps) <= 0.5
    # The streams catch up in steps without prompt work: on average they keep to the slowdown.
    assert 0 in chunks
    assert sum(s for _, s in steps) / len(steps) == pytest.approx(0.200, rel=0.1)
    # The last chunk is left a whole tile too (or takes the rest, within the limit).
    pacer.credit = 0.0
    assert pacer.chunks(8, [(100, 1)]) == [100]  # 100 x 4 ms: whole, within 500 ms
    pacer = PrefillPacer(512, slowdown=4.0, stall_s=0.35, tile=64)
    _warm(pacer)
    assert pacer.chunks(8, [(200, 1)]) == [65]  # 200 x 4 ms is over the limit: one tile, 135 left
    pacer = PrefillPacer(512, slowdown=4.0, stall_s=0.2, tile=64)
    _warm(pacer)  # a tile (256 ms) is over the limit: chunks under a tile, sized to the step's room
    assert pacer.chunks(8, [(1000, 1)]) == [26]  # (200 - 50 ms) / 5.6 ms


def test_prefill_pacer_knows_a_decode_step_by_its_streams() -> None:
    pacer = PrefillPacer(512, slowdown=4.0, stall_s=0.05)
    pacer.observe(1.0, 0, 250)  # 4 ms a prompt token
    for _ in range(30):
        pacer.observe(0.011, 1, 0)  # one stream alone (a warm-up request)
    assert pacer.chunks(1, [(1000, 0)]) == [9]  # (max(4 x 11 ms, 50 ms) - 11 ms) / 4 ms
    # Five streams, not measured alone yet: from one stream's step, scaled (5 x 11 ms).
    assert pacer.decode_s(5) == pytest.approx(0.055, rel=0.01)
    pacer.credit = 0.0
    assert pacer.chunks(5, [(1000, 0)]) == [41]  # (4 x 55 - 55 ms) / 4 ms
    for _ in range(30):
        pacer.observe(0.040, 5, 0)
    assert pacer.decode_s(5) == pytest.approx(0.040, rel=0.01)
    assert pacer.decode_s(1) == pytest.approx(0.011, rel=0.01)
    pacer.credit = 0.0
    assert pacer.chunks(5, [(1000, 0)]) == [30]
    pacer.credit = 0.0
    assert pacer.chunks(4, [(1000, 0)]) == [24]  # 4 streams: 4/5 of 40 ms
    pacer.observe(0.010, 0, 4)  # a chunk under min_chunk alone teaches nothing (noise)
    assert pacer.per_token_s == pytest.approx(0.004, rel=0.01)
    with pytest.raises(ValueError):
        PrefillPacer(512, slowdown=0.5)




def test_a_group_of_next_turns_each_takes_its_own_conversations_entry() -> None:
    """Eight conversations on one long system prompt, each slot holding its own: their next
    turns, placed together in any order, reuse their own entries (not a neighbour's, which would
    extend the first placed one's run of slots but recompute the previous reply)."""
    system = list(range(1000, 1600))
    history = {c: system + [c] * 100 for c in range(8)}
    for order in ([3, 5, 0, 7, 1, 6, 2, 4], list(range(8))):
        t = SlotTable(8)
        for c in range(8):
            t.place(history[c], {})
        for c in range(8):
            t.release(c, history[c])
        turns = {c: history[c] + [50 + c] * 40 for c in order}
        t.claim(turns.values())
        placed = {c: t.place(turns[c], {}) for c in order}
        t.claim(())
        assert all(p == Placement(c, c, len(history[c])) for c, p in placed.items()), placed
    # Without the claim, the first placed takes the lowest run, the next ones its neighbours'.
    t = SlotTable(8)
    for c in range(8):
        t.place(history[c], {})
    for c in range(8):
        t.release(c, history[c])
    first = t.place(history[3] + [9] * 40, {})
    assert first.slot == 3
    assert t.place(history[5] + [9] * 40, {}).slot != 5
