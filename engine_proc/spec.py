"""What the front and an engine process agree on, with nothing heavy imported: how to launch an
engine (:class:`EngineSpec`, :class:`BackendConfig`), which backends exist (:data:`BACKENDS`),
and the process target (:func:`run_engine`).

The front imports this module and never ``engine_proc.backends``: a backend's runtime (llama.cpp,
MLX) is imported only in the engine process. Adding a backend means one module under
``engine_proc/backends/`` and one :data:`BACKENDS` entry here.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine_proc.backends.base import Backend
    from ipc.channel import ChannelSpec


class ModelFormat(str, enum.Enum):
    """What a backend loads; the front checks a path against it before starting an engine."""

    gguf = "gguf"  # one GGUF file
    mlx = "mlx"  # a directory with config.json and safetensors weights
    any = "any"  # anything (test doubles)


@dataclass(frozen=True, slots=True)
class BackendInfo:
    name: str
    target: str  # "module:Class", imported in the engine process only
    format: ModelFormat
    summary: str
    embeddings: bool = True  # it can load a model for embeddings (enable_embeddings)
    requires: tuple[str, ...] = ()  # modules the engine imports (an optional extra's)
    extra: str = ""  # the pip extra that installs them

    def missing(self) -> str | None:
        """Why this backend cannot run in this installation, or None."""
        absent = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if not absent:
            return None
        return f"backend {self.name!r} needs {', '.join(absent)}: pip install 'axserving[{self.extra}]'"


# While streams decode, steps that also prefill a prompt take on average at most this many times
# a decode-only step (SmolLM2, 2 threads: 4 x ~45 ms): the default of ``prefill_slowdown``.
DEFAULT_PREFILL_SLOWDOWN = 4.0
# Prompt-lookup drafting, per sequence and step (see engine_proc.backends.lookup): 0, off.
DEFAULT_DRAFT_TOKENS = 0
# The longest one such step may stall the streams (or the slowdown's step, if longer), to take a
# short prompt whole (a chat turn of ~100 tokens here: one pass over the weights instead of four)
# or a long one in whole attention tiles (llama.cpp's CPU kernel: 64 query rows; under it a row
# attends alone, 1.35x the time a prompt token over a 1.2k-token prompt beside eight streams);
# the steps after it pay the time back. In-process, eight closed-loop 128-token streams and a
# 1.2k-token prompt every 2 s: 75-77 tok/s at 500 ms against 59-64 at 50 (chunks under a tile,
# sized to every step's room), streams' gaps p50 46-49 against 57-58 ms, p99 390-420 against
# 200-240 ms.
DEFAULT_PREFILL_STALL_MS = 500
# llama.cpp's attention kernel for generation: None, llama.cpp decides ("auto": on, on a CPU).
# perf/attention_kernels.py on this CPU (SmolLM2 Q4_1, 2 threads, split KV), a decode step
# without flash attention against with it: 1.03 / 1.05 / 1.16x the time at 1 / 8 / 16 sequences
# of 250 tokens of context each, 0.84 / 0.78 / 0.90x at 1000 tokens, 0.62 / 0.68 / 0.62x at 3000;
# prompts 1.09-1.16x. Off serves long chats faster (chat-shared-prefix against llama-server,
# which runs "auto": x1.78 throughput, x1.46 with it on), but it is not the default: without it
# a greedy reply batched forked late from the same prompt served alone (tests/slow/
# test_llama_batching.py: 1 prompt of 4; perf/batch_agreement.py --n 8 had all 8 identical).
# Not traced; likely: the flash-attention kernel skips masked cells, while the plain products
# run over as many cells as the batch's longest sequence holds. True: on; False: off.
DEFAULT_FLASH_ATTN: bool | None = None

BACKENDS: dict[str, BackendInfo] = {
    b.name: b
    for b in (
        BackendInfo(
            "llama_cpp", "engine_proc.backends.llama_cpp:LlamaCppBackend", ModelFormat.gguf,
            "llama.cpp through llama-cpp-python",
        ),
        BackendInfo(
            "mlx", "engine_proc.backends.mlx_lm:MlxBackend", ModelFormat.mlx,
            "MLX through mlx-lm (Metal on Apple Silicon; a slow reference CPU path on Linux)",
            embeddings=False, requires=("mlx", "mlx_lm"), extra="mlx",
        ),
        BackendInfo("fake", "engine_proc.backends.fake:FakeBackend", ModelFormat.any, "echo test double"),
    )
}


def size_bytes(value: int | str) -> int:
    """Bytes from an int or a string such as ``8GiB``, ``512 MB`` or ``1.5G`` (ValueError)."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]?)(i?)B?\s*", value, re.IGNORECASE)
    if not m:
        raise ValueError("expected bytes, or a size such as '8GiB'")
    number, unit, binary = m.groups()
    base = 1024 if binary or not unit else 1000
    return int(float(number) * base ** "_KMGTP".index(unit.upper() or "_"))


def backend_class(name: str) -> type[Backend]:
    try:
        info = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})") from None
    module, _, cls = info.target.partition(":")
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class BackendConfig:
    model_path: str
    n_ctx: int = 4096
    n_threads: int = 0  # 0: let the backend choose
    n_batch: int = 512  # tokens per llama_decode: one step's budget (decodes + prefill chunks)
    max_batch: int = 8  # sequences generated together (continuous batching)
    # max_batch is "auto": the backend may measure at load how many sequences are worth a step
    # and run no more at once (the rest of the max_batch slots keep prefix-cache entries).
    measure_batch: bool = False
    kv_unified: bool = False  # one KV pool of n_ctx cells for all sequences, else n_ctx each
    # Steps that prefill a prompt beside decoding streams take on average at most this many times
    # a decode-only step (engine_proc.backends.batching.PrefillPacer); 0: whole n_batch chunks.
    prefill_slowdown: float = DEFAULT_PREFILL_SLOWDOWN
    prefill_stall_ms: int = DEFAULT_PREFILL_STALL_MS  # the longest one step with a prompt may stall them
    flash_attn: bool | None = DEFAULT_FLASH_ATTN  # llama.cpp's flash attention; None: its "auto"
    # Prompt-lookup speculative decoding: at most this many tokens drafted per sequence and
    # step from its own earlier text (engine_proc.backends.lookup); 0: off.
    draft_tokens: int = DEFAULT_DRAFT_TOKENS
    embeddings: bool = False  # loaded for embeddings (pooled vectors), not generation
    pooling: str = ""  # mean, cls, last; "": the model's own (its metadata), else mean
    # Backend-specific knobs (the fake backend's delay, crash triggers, ...).
    options: tuple[tuple[str, str], ...] = ()

    def option(self, name: str, default: str = "") -> str:
        return dict(self.options).get(name, default)


def flash_attn_setting(config: BackendConfig) -> bool | str:
    """``flash_attn`` as it is configured: true, false or "auto"."""
    return "auto" if config.flash_attn is None else config.flash_attn


@dataclass(frozen=True)
class EngineSpec:
    model_id: str
    backend: str
    config: BackendConfig
    channel: ChannelSpec
    front_pid: int
    log_level: str = "INFO"
    log_format: str = "text"  # or json (one object per line), as the front's
    nice: int = 0  # added to the engine's niceness: the front's short bursts then run first


def run_engine(spec: EngineSpec) -> None:
    """The engine process's target (``spawn``): the loop and the backend are imported here."""
    from engine_proc.main import engine_main

    engine_main(spec)
