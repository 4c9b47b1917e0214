"""Prompt-lookup speculative decoding: drafts from a sequence's own text, and when they pay.

A decoding sequence whose last ``MATCH`` tokens occurred earlier in its prompt or reply is
likely to go on as it went on there (a quoted passage, code being edited, a list's pattern, a
small model's loop). :class:`NgramDraft` proposes those next tokens; the backend feeds them
after the sequence's pending token in the same step, with logits for every row, and draws each
row's token in order with the sequence's own sampler, keeping drafted tokens while they equal
what was drawn. Every token is drawn with the same sampler state from the logits of its own
row, so the reply is the one plain decoding gives as far as llama.cpp computes a row alike in
both: a step only yields more of it. Measured on SmolLM2: 8 sequences of up to 9 rows, rejected
rows dropped, against one row at a time: identical logits while a sequence holds fewer than
256 tokens; at 64 rows or more of a sequence its kernels round differently (hence the setting's
bound of 32), and so does a lone row of a longer context (another attention path than several
rows or several sequences take: logits up to 1.4 apart, batched decoding differs from lone the
same way), so there a reply may fork late, as batching makes it fork. On Gemma 3 Q4_K_M several
rows round differently from one, as batching does there. Compare vLLM's ``ngram`` speculator
and llama.cpp's lookup decoding; no draft model.

Drafted tokens are not free: on a CPU a step's time grows with its tokens (SmolLM2, 2 threads:
one sequence 7 ms for 1 token, 12 for 2, 17 for 4, 25 for 8; eight sequences 30 ms for 8
tokens, 50 for 16). :func:`plan_drafts` feeds a drafted token only while its chance of being
kept (``p ** j`` for the ``j``-th of a sequence whose drafts have been kept at rate ``p``) times
what a token costs in a plain step is more than what it costs drafted (:class:`DraftCost`,
measured as the engine runs, which also holds the rows down while drafting steps yield fewer
tokens a second than plain ones): at one stream that is several tokens of a repeating passage,
at eight streams only sure ones, and on an engine whose steps are memory-bound (a GPU), many.
Short matches predict poorly (1-2 token matches were kept 8-28% of the time here, 4+ tokens
~90%), hence ``MATCH`` = 4.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

MATCH: Final = 4  # tokens of the sequence's tail that must have occurred before
PRIOR: Final = 0.8  # kept rate assumed of a sequence that has not drafted yet
ALPHA: Final = 0.25  # weight of the newest observation in the kept rate
RECOVER: Final = 0.02  # per step without a draft, the kept rate drifts back this far to PRIOR
# Until drafted rows' cost has been measured: this much of a plain step each (0.4-0.7 here).
DEFAULT_COST: Final = 0.5
# After this many steps without a drafted token the cost measured is old (it may have been a
# slow step's): drafting resumes at DEFAULT_COST, one row, and measures it again. Each time
# drafting stops for not paying the wait doubles (a probe is a slow step), up to MAX_STALE_STEPS.
STALE_STEPS: Final = 64
MAX_STALE_STEPS: Final = 4096


class NgramDraft:
    """One sequence's n-gram indexes (every ``MATCH`` tokens, and every token, -> where they
    were last followed) and the rate at which its drafts have been kept."""

    __slots__ = ("_grams", "_indexed", "_tokens", "kept")

    def __init__(self) -> None:
        self._grams: dict[tuple[int, ...], int] = {}
        self._tokens: dict[int, int] = {}
        self._indexed = 0  # positions indexed so far
        self.kept = PRIOR

    def propose(self, tokens: Sequence[int], limit: int) -> tuple[list[int], int]:
        """``limit`` tokens to feed after ``tokens`` (which only grows between calls), and how
        many of them are a draft: what followed the latest earlier occurrence of the last
        ``MATCH`` tokens (all of them, if there is one). Else they only fill the step's rows
        (all sequences feed as many, see :func:`plan_drafts`): what followed the latest earlier
        occurrence of the token before each."""
        n = len(tokens)
        grams, singles = self._grams, self._tokens
        # A gram is indexed once it has a continuation; the latest occurrence wins.
        for i in range(self._indexed, n - 1):
            singles[tokens[i]] = i + 1
            if i >= MATCH - 1:
                grams[tuple(tokens[i - MATCH + 1 : i + 1])] = i + 1
        self._indexed = max(self._indexed, n - 1)
        if limit < 1 or n == 0:
            return [], 0
        at = grams.get(tuple(tokens[n - MATCH :])) if n > MATCH else None
        # Past the end of what followed, the passage repeats: a loop goes on as a loop.
        draft = [] if at is None else [tokens[at + i % (n - at)] for i in range(limit)]
        sure = len(draft)
        last = draft[-1] if draft else tokens[-1]
        while len(draft) < limit:
            at = singles.get(last)
            last = last if at is None else tokens[at]
            draft.append(last)
        return draft, sure

    def observe(self, drafted: int, kept: int) -> None:
        """Of ``drafted`` drafted tokens the first ``kept`` were kept."""
        if drafted == 0:
            self.kept += RECOVER * (PRIOR - self.kept)
            return
        for j in range(min(kept + 1, drafted)):  # after the first miss nothing was tried
            self.kept += ALPHA * ((1.0 if j < kept else 0.0) - self.kept)


def plan_drafts(
    kept: Sequence[float], sure: Sequence[int], plain_s: float, fixed_s: float, per_row_s: float, limit: int
) -> int:
    """How many rows after its pending token every decoding sequence feeds this step (0: a
    plain step), to make the most tokens a second.

    llama.cpp splits a step with per-sequence KV caches into micro-batches of as many tokens of
    each sequence, each a pass over the weights: sequences feeding unequal rows cost passes
    (SmolLM2, 8 streams: 4, 3, 4, 2, 4, 4, 3, 4 rows took 134 ms, 4 each 95, 1 each 32). So
    all feed the same ``k`` rows, a sequence with fewer drafted (``sure``) tokens filling the
    rest with guesses. Sequence ``i`` keeps its ``j``-th drafted token with chance
    ``kept[i] ** j``; the step takes ``plain_s + fixed_s + k * per_row_s``."""
    n = len(kept)
    best_k, best_rate = 0, n / plain_s if plain_s > 0 else 0.0
    gain = 0.0
    for k in range(1, max(limit, 0) + 1):
        gain += sum(p**k for p, m in zip(kept, sure, strict=True) if m >= k)
        rate = (n + gain) / (plain_s + fixed_s + k * per_row_s)
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k


class DraftCost:
    """What drafted rows cost beside some number of streams, and what they yield, measured.

    The cost: how much longer than a plain decode step a step with ``k`` rows after each
    pending token took, fitted as ``fixed_s + k * per_row_s`` over moving averages (on a CPU the
    first row costs more than the next: one sequence, 2 threads, +5.4 ms for one, +10 ms for
    three, +18 ms for seven). The yield checks the plan's model (a kept rate is a guess about
    the next tokens): ``gain``, a moving average of a drafting step's tokens a second over a plain
    step's. The rows a step may take (``cap``) start at one; while the gain is under 1 they come
    down by one after each drafting step, else they may go one past the last step's."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.cap = min(1, limit)
        self.gain: float | None = None
        self._moments: tuple[float, float, float, float] | None = None  # E[k], E[t], E[k^2], E[kt]
        self._since = 0  # steps planned since the last one measured
        self._patience = STALE_STEPS

    def observe(self, seconds: float, plain_s: float | None, rows: int, produced: int, n_decoding: int) -> None:
        """A step of ``n_decoding`` streams, each with ``rows`` rows after its pending token, took
        ``seconds`` and drew ``produced`` tokens; a plain one takes ``plain_s``."""
        if rows < 1 or plain_s is None or plain_s <= 0.0 or seconds <= 0.0 or n_decoding < 1:
            return
        self._since = 0
        k, t = float(rows), seconds - plain_s
        new = (k, t, k * k, k * t)
        old = self._moments
        self._moments = new if old is None else tuple(o + ALPHA * (n - o) for o, n in zip(old, new, strict=True))  # type: ignore[assignment]
        ratio = produced * plain_s / (n_decoding * seconds)
        self.gain = ratio if self.gain is None else self.gain + ALPHA * (ratio - self.gain)
        if self.gain < 1.0:
            self.cap = max(0, rows - 1)
            if self.cap == 0:
                self._patience = min(2 * self._patience, MAX_STALE_STEPS)
        else:
            self.cap = min(self.limit, rows + 1)
            self._patience = STALE_STEPS

    def costs(self, plain_s: float) -> tuple[float, float]:
        """(fixed_s, per_row_s): as measured; a guess (``DEFAULT_COST`` of a plain step a row,
        nothing fixed) until a step with drafted rows has been seen, or when the last was long ago."""
        self._since += 1
        if self._since > self._patience:
            self._moments, self.gain, self.cap = None, None, max(self.cap, min(1, self.limit))
        if self._moments is None:
            return 0.0, DEFAULT_COST * plain_s
        mk, mt, mkk, mkt = self._moments
        var = mkk - mk * mk
        slope = (mkt - mk * mt) / var if var > 0.25 else mt / mk  # drafts all of one size: no fixed part seen
        slope = max(slope, 0.0)
        return max(mt - slope * mk, 0.0), slope
