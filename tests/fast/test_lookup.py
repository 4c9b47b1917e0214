"""Prompt-lookup drafting: what is proposed, how kept rates and costs are learned, and when a
step drafts (engine_proc.backends.lookup). The real model's replies with it on are checked in
tests/slow/test_llama_batching.py."""

from __future__ import annotations

import pytest

from engine_proc.backends.lookup import MATCH, PRIOR, STALE_STEPS, DraftCost, NgramDraft, plan_drafts


def test_a_repeated_passage_is_drafted_from_where_it_went_on_before() -> None:
    passage = [11, 12, 13, 14, 15, 16, 17]
    tokens = [1, 2] + passage + [3, 4] + passage[:MATCH]
    draft, sure = NgramDraft().propose(tokens, 3)
    assert (draft, sure) == ([15, 16, 17], 3)


def test_the_latest_occurrence_wins_and_the_index_grows_with_the_tokens() -> None:
    lookup = NgramDraft()
    tokens = [5, 6, 7, 8, 1, 9, 5, 6, 7, 8]
    assert lookup.propose(tokens, 1) == ([1], 1)
    tokens += [2, 0, 5, 6, 7, 8]  # now followed by 2 most recently
    assert lookup.propose(tokens, 2) == ([2, 0], 2)


def test_without_a_match_the_rows_are_filled_but_nothing_is_drafted() -> None:
    tokens = [1, 2, 3, 4, 5, 3]
    draft, sure = NgramDraft().propose(tokens, 3)
    assert sure == 0 and len(draft) == 3
    assert draft[0] == 4  # what followed the last token's earlier occurrence
    assert NgramDraft().propose([7], 2) == ([7, 7], 0)
    assert NgramDraft().propose([1, 2, 3], 0) == ([], 0)


def test_past_the_end_of_what_followed_a_loop_goes_on_as_a_loop() -> None:
    tokens = [1, 2, 3, 4, 9, 8, 1, 2, 3, 4]  # the match is followed by 9, 8, then the tail
    assert NgramDraft().propose(tokens, 8) == ([9, 8, 1, 2, 3, 4, 9, 8], 8)


def test_the_kept_rate_follows_what_was_kept_and_recovers_when_idle() -> None:
    lookup = NgramDraft()
    lookup.observe(4, 4)
    high = lookup.kept
    assert high > PRIOR
    lookup.observe(4, 0)  # the first missed: only one token was tried
    assert lookup.kept < high
    low = NgramDraft()
    for _ in range(10):
        low.observe(3, 0)
    assert low.kept < 0.1
    before = low.kept
    low.observe(0, 0)
    assert before < low.kept < PRIOR


def test_plan_drafts_takes_rows_only_while_they_pay() -> None:
    # One stream, drafts kept 95%: a row costs 30% of a plain step: several rows pay.
    assert plan_drafts([0.95], [6], 0.007, 0.0, 0.0021, 6) >= 4
    # Rows as dear as a plain step never pay.
    assert plan_drafts([0.99], [6], 0.007, 0.0, 0.007, 6) == 0
    # Eight streams, a row level costs 70% of a plain step: only if nearly all have sure drafts.
    assert plan_drafts([0.95] * 8, [6] * 8, 0.030, 0.0, 0.021, 6) >= 1
    assert plan_drafts([0.95] + [0.8] * 7, [6] + [0] * 7, 0.030, 0.0, 0.021, 6) == 0
    # No further rows than the limit, none without a sure draft.
    assert plan_drafts([0.99], [6], 0.007, 0.0, 0.001, 2) == 2
    assert plan_drafts([0.99], [0], 0.007, 0.0, 0.001, 6) == 0
    # A fixed cost per drafting step can make a single row not worth it but several worth it.
    assert plan_drafts([0.95], [6], 0.007, 0.006, 0.0015, 1) == 0
    assert plan_drafts([0.95], [6], 0.007, 0.006, 0.0015, 6) > 1


def test_draft_cost_fits_a_fixed_and_a_per_row_part() -> None:
    cost = DraftCost(6)
    assert cost.costs(0.010) == (0.0, pytest.approx(0.005))  # a guess until measured
    for _ in range(20):
        for rows in (1, 3, 6):
            cost.observe(0.010 + 0.004 + 0.002 * rows, 0.010, rows, 1 + rows, 1)
    fixed, per_row = cost.costs(0.010)
    assert fixed == pytest.approx(0.004, abs=5e-4) and per_row == pytest.approx(0.002, abs=2e-4)
    cost.observe(0.5, None, 3, 4, 1)  # no plain step to compare with: ignored
    assert cost.costs(0.010)[1] == pytest.approx(per_row)


def test_rows_climb_while_drafting_pays_and_come_down_while_it_does_not() -> None:
    one = DraftCost(6)
    assert one.cap == 1  # drafting starts with one row
    one.observe(0.012, 0.007, 1, 2, 1)  # 2 tokens in 12 ms against 1 in 7: 1.17x
    assert one.gain is not None and one.gain > 1.0 and one.cap == 2
    for rows in (2, 3, 4, 5, 6):
        one.observe(0.007 + 0.0025 * rows, 0.007, rows, 1 + rows, 1)
    assert one.cap == 6
    # Eight streams, a plain step 30 ms; six rows took 160 ms and drew 20 tokens: 0.47x.
    eight = DraftCost(6)
    eight.cap = 6
    eight.observe(0.160, 0.030, 6, 20, 8)
    assert eight.gain == pytest.approx(20 * 0.030 / (8 * 0.160)) and eight.cap == 5
    for rows in (5, 4, 3, 2, 1):
        eight.observe(0.030 + 0.021 * rows, 0.030, rows, 8 + rows, 8)
    assert eight.cap == 0


def test_a_cost_measured_long_ago_is_measured_again_later_each_time_it_did_not_pay() -> None:
    cost = DraftCost(6)
    cost.observe(0.100, 0.010, 1, 1, 1)  # one slow step made rows look dear, and yielded nothing
    assert cost.costs(0.010)[1] > 0.05 and cost.cap == 0
    for _ in range(2 * STALE_STEPS - 1):  # the first stop: twice the usual wait
        cost.costs(0.010)
    assert cost.cap == 0
    assert cost.costs(0.010) == (0.0, pytest.approx(0.005)) and cost.cap == 1 and cost.gain is None
    cost.observe(0.100, 0.010, 1, 1, 1)  # the probe did not pay either: the wait doubles again
    for _ in range(4 * STALE_STEPS):
        cost.costs(0.010)
    assert cost.cap == 0
    cost.costs(0.010)
    assert cost.cap == 1
