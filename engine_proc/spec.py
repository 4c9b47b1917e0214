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


BACKENDS: dict[str, BackendInfo] = {
    b.name: b
    for b in (
        BackendInfo(
            "llama_cpp", "engine_proc.backends.llama_cpp:LlamaCppBackend", ModelFormat.gguf,
            "llama.cpp through llama-cpp-python",
        ),
        BackendInfo("fake", "engine_proc.backends.fake:FakeBackend", ModelFormat.any, "echo test double"),
    )
}


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
    kv_unified: bool = False  # one KV pool of n_ctx cells for all sequences, else n_ctx each
    embeddings: bool = False  # loaded for embeddings (pooled vectors), not generation
    pooling: str = ""  # mean, cls, last; "": the model's own (its metadata), else mean
    # Backend-specific knobs (the fake backend's delay, crash triggers, ...).
    options: tuple[tuple[str, str], ...] = ()

    def option(self, name: str, default: str = "") -> str:
        return dict(self.options).get(name, default)


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
