"""The NumPy sampler (MLX backend): llama.cpp's chain, in the same order and meaning."""

from __future__ import annotations

import numpy as np
import pytest

from engine_proc.backends.np_sampling import PENALTY_LAST_N, NumpySampler
from ipc.records import SamplingParams


def logits(*peaks: tuple[int, float], n: int = 50) -> np.ndarray:
    x = np.zeros(n, dtype=np.float32)
    for t, v in peaks:
        x[t] = v
    return x


def test_greedy_is_the_argmax_and_leaves_the_logits_alone() -> None:
    x = logits((7, 5.0), (3, 4.0))
    assert NumpySampler(SamplingParams(max_tokens=8, temperature=0.0)).sample(x) == 7
    assert x[7] == 5.0


def test_logit_bias_bans_and_promotes() -> None:
    x = logits((7, 5.0), (3, 4.0))
    assert NumpySampler(SamplingParams(max_tokens=8, temperature=0.0), [(7, -100.0)]).sample(x) == 3
    assert NumpySampler(SamplingParams(max_tokens=8, temperature=0.0), [(9, 10.0)]).sample(x) == 9


def test_penalties_turn_away_from_what_was_drawn() -> None:
    x = logits((7, 5.0), (3, 4.5))
    s = NumpySampler(SamplingParams(max_tokens=8, temperature=0.0, frequency_penalty=1.0))
    assert [s.sample(x) for _ in range(2)] == [7, 3]
    r = NumpySampler(SamplingParams(max_tokens=8, temperature=0.0, repeat_penalty=1.5))
    assert [r.sample(x) for _ in range(2)] == [7, 3]  # 5 / 1.5 < 4.5
    p = NumpySampler(SamplingParams(max_tokens=8, temperature=0.0, presence_penalty=0.4))
    assert [p.sample(x) for _ in range(3)] == [7, 7, 7]  # presence counts once: 4.6 > 4.5
    assert PENALTY_LAST_N == 64


def test_a_seed_reproduces_the_draws_and_top_k_1_is_greedy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=200).astype(np.float32)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=42)
    a, b = NumpySampler(params), NumpySampler(params)
    draws = [a.sample(x) for _ in range(20)]
    assert draws == [b.sample(x) for _ in range(20)] and len(set(draws)) > 3
    assert NumpySampler(SamplingParams(max_tokens=8, temperature=1.0, top_k=1, seed=1)).sample(x) == int(np.argmax(x))


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=8, temperature=1.0, top_p=0.5, seed=1),
                                    SamplingParams(max_tokens=8, temperature=1.0, min_p=0.5, seed=1)])
def test_top_p_and_min_p_keep_only_the_likely_tokens(params: SamplingParams) -> None:
    x = logits((1, 10.0), (2, 9.9), n=1000)  # two likely tokens among many unlikely ones
    s = NumpySampler(params)
    assert {s.sample(x) for _ in range(50)} <= {1, 2}


def test_a_grammar_masked_row_only_draws_allowed_tokens() -> None:
    x = logits((7, 5.0))
    x[:] = -np.inf
    x[[4, 9]] = 0.0
    s = NumpySampler(SamplingParams(max_tokens=8, temperature=0.8, seed=3))
    assert {s.sample(x) for _ in range(30)} <= {4, 9}
