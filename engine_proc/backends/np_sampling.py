"""A request's sampler over a logits vector in NumPy, for runtimes that hand us logits (MLX).

It follows the chain :mod:`.llama_sampling` builds in llama.cpp, in the same order and with the
same meaning, so a request samples alike on either backend: ``logit_bias``, then the penalties
over the last :data:`PENALTY_LAST_N` tokens (llama.cpp's
repeat penalty, OpenAI's frequency and presence penalties), then top-k, top-p, min-p,
temperature and a seeded draw; temperature 0 is an argmax after the penalties.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence

import numpy as np

from ipc.records import SamplingParams

# OpenAI's frequency/presence penalties and llama.cpp's repeat penalty look this far back.
PENALTY_LAST_N = 64


class NumpySampler:
    __slots__ = ("_bias", "_history", "_params", "_penalties", "_rng")

    def __init__(self, params: SamplingParams, logit_bias: Sequence[tuple[int, float]] = ()) -> None:
        self._params = params
        self._bias = (np.array([t for t, _ in logit_bias], dtype=np.int64),
                      np.array([b for _, b in logit_bias], dtype=np.float32)) if logit_bias else None
        self._penalties = (
            params.repeat_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
        )
        self._history: deque[int] = deque(maxlen=PENALTY_LAST_N)
        self._rng = np.random.default_rng(params.seed)

    def sample(self, logits: np.ndarray) -> int:
        """Draw a token from ``logits`` (float32, one row; left unchanged) and remember it."""
        p = self._params
        x = logits.astype(np.float32, copy=True)
        if self._bias is not None:
            np.add.at(x, self._bias[0], self._bias[1])
        if self._penalties and self._history:
            self._penalize(x)
        token = int(np.argmax(x)) if p.temperature <= 0.0 else self._draw(x)
        self._history.append(token)
        return token

    def _penalize(self, x: np.ndarray) -> None:
        p = self._params
        counts = Counter(self._history)
        ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        n = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
        v = x[ids]
        if p.repeat_penalty != 1.0:
            v = np.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)
        x[ids] = v - n * p.frequency_penalty - p.presence_penalty

    def _draw(self, x: np.ndarray) -> int:
        p = self._params
        ids = np.flatnonzero(np.isfinite(x))
        if ids.size == 0:
            return int(np.argmax(x))
        v = x[ids]
        order = np.argsort(-v, kind="stable")
        if p.top_k > 0:
            order = order[: p.top_k]
        ids, v = ids[order], v[order]  # most likely first
        if p.top_p < 1.0:
            probs = _softmax(v)
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            ids, v = ids[:keep], v[:keep]
        if p.min_p > 0.0:
            keep_min = v >= v[0] + np.log(p.min_p)
            ids, v = ids[keep_min], v[keep_min]
        probs = _softmax(v / p.temperature)
        return int(ids[self._rng.choice(ids.size, p=probs)])


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v.astype(np.float64) - v.max())
    return e / e.sum()
