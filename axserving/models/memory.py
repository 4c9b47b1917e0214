"""How much memory a model will take once loaded, estimated before its engine starts, and how
much the machine lets the models have together.

The estimate is the weights (the file: llama.cpp maps it and touches all of it) plus the KV
cache (f16 K and V for every layer and every cell: ``ctx_size`` cells per sequence, times
``max_batch`` with split caches, once with the unified one), without flash attention the
attention scores of a whole step (see :func:`attention_scores_bytes`), plus a fixed engine
overhead (an interpreter, compute buffers, logits). It errs high on purpose (sliding-window layers are
counted as full): a model refused up front beats an engine killed for memory.
"""

from __future__ import annotations

import os

from axserving.config import parse_size

ENGINE_OVERHEAD_BYTES = 160 << 20  # a spawned interpreter with llama-cpp-python, compute buffers
DEFAULT_BUDGET_SHARE = 0.75
_KV_CELL_ROUND = 256  # llama.cpp rounds a context up to a multiple of this


AUTO_MAX_BATCH = 16  # the most sequences max_batch "auto" gives a model
AUTO_FALLBACK_BATCH = 8  # "auto" for a model whose KV size is not known before loading
AUTO_KV_SHARE = 0.25  # of the machine's memory budget, at most, for one model's KV cache


def auto_max_batch(ctx_size: int, kv_unified: bool, kv_bytes_per_cell: int | None, budget: int | None = None) -> int:
    """``max_batch: auto``: 16 sequences, halved (down to 1) until the model's KV cache takes at
    most a quarter of the memory budget. On 2 CPU cores SmolLM2 decodes 1.2x the tokens per
    second at 16 as at 8 (``perf/bench_engine.py --batch 8,16``), and a batch only fills as far
    as the load does, so the larger one costs latency only when 16 requests are running (each
    step then serves twice the streams). A unified cache's size does not grow with it."""
    if not kv_bytes_per_cell:
        return AUTO_FALLBACK_BATCH
    if kv_unified:
        return AUTO_MAX_BATCH
    limit = (default_budget() if budget is None else budget) * AUTO_KV_SHARE
    batch = AUTO_MAX_BATCH
    while batch > 1 and kv_cells(ctx_size, batch, False) * kv_bytes_per_cell > limit:
        batch //= 2
    return batch


def kv_cells(ctx_size: int, max_batch: int, kv_unified: bool) -> int:
    per_seq = -(-ctx_size // _KV_CELL_ROUND) * _KV_CELL_ROUND
    return per_seq if kv_unified else per_seq * max_batch


def attention_scores_bytes(ctx_size: int, batch_size: int, n_head: int) -> int:
    """Without flash attention llama.cpp holds a step's attention scores whole: f32, every head,
    every token of the step against every cell of a sequence's context. Reserved at load for the
    longest (SmolLM2, 9 heads: 72 MiB at the default 4096 x 512, 576 MiB at 32k); flash
    attention streams them instead."""
    per_seq = -(-ctx_size // _KV_CELL_ROUND) * _KV_CELL_ROUND
    return per_seq * batch_size * n_head * 4


def estimate(
    weights_bytes: int, kv_bytes_per_cell: int, cells: int, n_vocab: int = 0, max_batch: int = 1, scores: int = 0
) -> int:
    logits = n_vocab * 4 * max_batch
    return weights_bytes + kv_bytes_per_cell * cells + logits + scores + ENGINE_OVERHEAD_BYTES


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30


def default_budget() -> int:
    return int(physical_memory() * DEFAULT_BUDGET_SHARE)


def budget(max_memory_bytes: int | str | None) -> int:
    """``lifecycle.max_memory_bytes`` in bytes: as set, else :func:`default_budget`."""
    return default_budget() if max_memory_bytes is None else parse_size(max_memory_bytes, "lifecycle.max_memory_bytes")


def fmt(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
