"""llama.cpp's native sampler chain, built from a request's :class:`~ipc.records.SamplingParams`.

Sampling runs inside llama.cpp (``llama_sampler_sample``) so no logits cross into Python.
The chain follows llama.cpp's own ``common_sampler`` order: penalties, top-k, top-p, min-p,
temperature, then a seeded draw; temperature 0 is a plain argmax after the penalties.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import llama_cpp

from ipc.records import SamplingParams

from engine_proc.backends.np_sampling import PENALTY_LAST_N  # the same history as the NumPy chain

# llama.cpp reads this seed as "pick a random one"; user seeds are folded below it.
_RANDOM_SEED = llama_cpp.LLAMA_DEFAULT_SEED


def chain_seed(seed: int | None) -> int:
    """The 32-bit seed for ``llama_sampler_init_dist``: fixed for a given request seed."""
    if seed is None:
        return random.getrandbits(32) % _RANDOM_SEED
    return seed % _RANDOM_SEED


def _has_penalties(params: SamplingParams) -> bool:
    return (
        params.repeat_penalty != 1.0
        or params.frequency_penalty != 0.0
        or params.presence_penalty != 0.0
    )


class SamplerChain:
    """Owns one ``llama_sampler`` chain; call :meth:`free` exactly once when the sequence ends."""

    def __init__(
        self, params: SamplingParams, n_vocab: int, logit_bias: Sequence[tuple[int, float]] = ()
    ) -> None:
        self._chain: llama_cpp.llama_sampler_p | None = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params()
        )
        if self._chain is None:
            raise MemoryError("llama_sampler_chain_init failed")
        # The chain takes ownership of every sampler added to it and frees them with itself.
        if logit_bias:
            # OpenAI's logit_bias is added to the logits before sampling; -100 bans a token.
            biases = (llama_cpp.llama_logit_bias * len(logit_bias))(
                *(llama_cpp.llama_logit_bias(t, b) for t, b in logit_bias)
            )
            self._add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(logit_bias), biases))
        if _has_penalties(params):
            self._add(
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab,
                    PENALTY_LAST_N,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                )
            )
        if params.temperature <= 0.0:
            self._add(llama_cpp.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            self._add(llama_cpp.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            self._add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            self._add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
        self._add(llama_cpp.llama_sampler_init_temp(params.temperature))
        self._add(llama_cpp.llama_sampler_init_dist(chain_seed(params.seed)))

    def _add(self, sampler: llama_cpp.llama_sampler_p) -> None:
        llama_cpp.llama_sampler_chain_add(self._chain, sampler)

    def sample(self, ctx: llama_cpp.llama_context_p, idx: int) -> int:
        """Sample (and accept, for the penalties' history) a token from the ``idx``-th output."""
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, idx))

    def free(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
