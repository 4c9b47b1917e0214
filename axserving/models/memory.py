"""How much memory a model will take once loaded, estimated before its engine starts, and how
much the machine lets the models have together.

The estimate is the weights (the file: llama.cpp maps it and touches all of it) plus the KV
cache (f16 K and V for every layer and every cell: ``ctx_size`` cells per sequence, times
``max_batch`` with split caches, once with the unified one) plus a fixed engine overhead (an
interpreter, compute buffers, logits). It errs high on purpose (sliding-window layers are
counted as full): a model refused up front beats an engine killed for memory.
"""

from __future__ import annotations

import os

ENGINE_OVERHEAD_BYTES = 160 << 20  # a spawned interpreter with llama-cpp-python, compute buffers
DEFAULT_BUDGET_SHARE = 0.75
_KV_CELL_ROUND = 256  # llama.cpp rounds a context up to a multiple of this


def kv_cells(ctx_size: int, max_batch: int, kv_unified: bool) -> int:
    per_seq = -(-ctx_size // _KV_CELL_ROUND) * _KV_CELL_ROUND
    return per_seq if kv_unified else per_seq * max_batch


def estimate(weights_bytes: int, kv_bytes_per_cell: int, cells: int, n_vocab: int = 0, max_batch: int = 1) -> int:
    logits = n_vocab * 4 * max_batch
    return weights_bytes + kv_bytes_per_cell * cells + logits + ENGINE_OVERHEAD_BYTES


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30


def default_budget() -> int:
    return int(physical_memory() * DEFAULT_BUDGET_SHARE)


def fmt(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
