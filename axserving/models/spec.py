"""From a model's entry (``models:`` in the config, or a ``POST /v1/models`` body) to what it
takes to run it: :class:`ModelSpec`, with the file checked, the backend chosen, the sampling
defaults layered and the memory estimated.

:func:`resolve` does file I/O (a stat, the GGUF header): the CLI calls it before the server
starts; the running front calls it in a worker thread, never on the event loop.
"""

from __future__ import annotations

import json

import os
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from axserving import model_store
from axserving.config import (
    AUTO_BACKEND,
    ConfigError,
    ModelConfig,
    ModelDefaults,
    SamplingDefaults,
    check_prefill_slowdown,
    parse_size,
)
from axserving.errors import Forbidden, UnprocessableRequest
from axserving.models import gguf, memory
from axserving.models.routing import RoutingError, load_map
from engine_proc.spec import BACKENDS, BackendConfig, ModelFormat

FAKE_SCHEME = "fake://"


@dataclass(frozen=True)
class ModelSpec:
    id: str
    path: str
    backend: str
    engine: BackendConfig
    aliases: tuple[str, ...] = ()
    pinned: bool = False
    idle_timeout_secs: float = 0.0
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    memory_bytes: int = 0
    memory_estimated: bool = True  # False: the entry gave memory_bytes
    architecture: str | None = None
    description: str = ""
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", (self.id, *self.aliases))


def _merge_sampling(*layers: SamplingDefaults | dict[str, float]) -> SamplingDefaults:
    """The first layer that sets a field wins."""
    out: dict[str, object] = {}
    for layer in layers:
        values = layer if isinstance(layer, dict) else msgspec.structs.asdict(layer)
        for key, value in values.items():
            if value is not None and key not in out:
                out[key] = value
    try:
        return msgspec.convert(out, SamplingDefaults)
    except msgspec.ValidationError:  # a file's own recommendation out of range: ignore the file's
        return layers[0] if isinstance(layers[0], SamplingDefaults) else SamplingDefaults()


def check_allowed(path: Path, allowed_dirs: tuple[str, ...]) -> None:
    """403 unless ``path`` (symlinks resolved) lies under one of ``allowed_dirs`` (if any)."""
    if not allowed_dirs:
        return
    real = os.path.realpath(path)
    for d in allowed_dirs:
        root = os.path.realpath(os.path.expanduser(d))
        if os.path.commonpath([real, root]) == root:
            return
    raise Forbidden(
        f"model path {str(path)!r} is outside the allowed directories (AXS_MODEL_ALLOWED_DIRS)", param="path"
    )


def resolve(
    entry: ModelConfig,
    defaults: ModelDefaults,
    cache_dir: str,
    allowed_dirs: tuple[str, ...] = (),
    memory_budget: int | None = None,
) -> ModelSpec:
    """Check the entry's file and fill in everything its engine needs. Raises
    :class:`~axserving.errors.UnprocessableRequest` (422) for a missing or unusable file or a
    backend that cannot serve it, :class:`~axserving.errors.Forbidden` (403) outside
    ``allowed_dirs``. ``memory_budget`` (``lifecycle.max_memory_bytes``; None: the machine's
    default) sizes ``max_batch: auto``."""
    backend = entry.backend or defaults.backend
    recommended: dict[str, float] = {}
    info: gguf.GGUFInfo | None = None
    if entry.path is None:
        if backend == "fake":
            path = f"{FAKE_SCHEME}echo"
        else:
            file = model_store.cached_path(model_store.DEFAULT_MODEL, model_store.cache_dir(cache_dir))
            if not file.is_file():  # the CLI fetched it; a load through the API never fetches
                file = model_store.ensure(model_store.DEFAULT_MODEL, model_store.cache_dir(cache_dir))
            path = str(file)
            recommended = dict(model_store.DEFAULT_MODEL.sampling)
    elif entry.path.startswith(FAKE_SCHEME):
        path = entry.path
        if backend == AUTO_BACKEND:
            backend = "fake"
    else:
        if "\x00" in entry.path:  # no file system takes it (os.stat raises ValueError)
            raise UnprocessableRequest("model file path contains a NUL character", param="path", code="invalid_path")
        p = Path(entry.path).expanduser()
        check_allowed(p, allowed_dirs)
        if not p.exists():
            raise UnprocessableRequest(f"model file {entry.path!r}: no such file", param="path", code="model_file_missing")
        path = str(p.resolve())
    if not path.startswith(FAKE_SCHEME):
        p = Path(path)
        backend, info = _route(p, backend)
        if info is not None:
            recommended = {**info.sampling(), **recommended}
    if backend not in BACKENDS:
        raise UnprocessableRequest(
            f"unknown backend {backend!r} (known: {', '.join([AUTO_BACKEND, *BACKENDS])})",
            param="backend", code="unknown_backend",
        )

    if entry.enable_embeddings and not BACKENDS[backend].embeddings:
        raise UnprocessableRequest(
            f"backend {backend!r} does not serve embeddings; load a GGUF file with llama_cpp for them",
            param="enable_embeddings", code="embeddings_unsupported",
        )

    def pick(value: object, fallback: object) -> object:
        return fallback if value is None else value

    options = entry.backend_options if entry.backend_options is not None else defaults.backend_options
    slowdown = pick(entry.prefill_slowdown, defaults.prefill_slowdown)
    try:
        check_prefill_slowdown(slowdown, "prefill_slowdown")  # type: ignore[arg-type]
    except ConfigError as e:
        raise UnprocessableRequest(str(e).removeprefix("invalid configuration: "), param="prefill_slowdown") from e
    engine = BackendConfig(
        model_path=path,
        n_ctx=pick(entry.ctx_size, defaults.ctx_size),  # type: ignore[arg-type]
        n_threads=pick(entry.threads, defaults.threads),  # type: ignore[arg-type]
        n_batch=pick(entry.batch_size, defaults.batch_size),  # type: ignore[arg-type]
        max_batch=_max_batch(pick(entry.max_batch, defaults.max_batch), info, entry, defaults, memory_budget),
        measure_batch=pick(entry.max_batch, defaults.max_batch) == "auto",
        kv_unified=pick(entry.kv_unified, defaults.kv_unified),  # type: ignore[arg-type]
        prefill_slowdown=float(slowdown),  # type: ignore[arg-type]
        prefill_stall_ms=pick(entry.prefill_stall_ms, defaults.prefill_stall_ms),  # type: ignore[arg-type]
        flash_attn=None if (fa := pick(entry.flash_attn, defaults.flash_attn)) == "auto" else fa,  # type: ignore[arg-type]
        draft_tokens=pick(entry.draft_tokens, defaults.draft_tokens),  # type: ignore[arg-type]
        embeddings=entry.enable_embeddings,
        pooling=entry.pooling or "",
        options=tuple(sorted(options.items())),
    )
    if entry.memory_bytes is not None:
        try:
            size, estimated = parse_size(entry.memory_bytes, "memory_bytes"), False
        except ConfigError as e:
            raise UnprocessableRequest(str(e).removeprefix("invalid configuration: "), param="memory_bytes") from e
    else:
        size, estimated = _estimate(path, info, engine), True
    description = ""
    if info is not None:
        description = str(info.metadata.get("general.name") or "")
    return ModelSpec(
        id=entry.id,
        path=path,
        backend=backend,
        engine=engine,
        aliases=tuple(entry.aliases),
        pinned=entry.pinned,
        idle_timeout_secs=float(pick(entry.idle_timeout_secs, defaults.idle_timeout_secs)),  # type: ignore[arg-type]
        sampling=_merge_sampling(entry.sampling, recommended),
        memory_bytes=size,
        memory_estimated=estimated,
        architecture=info.architecture if info is not None else _directory_architecture(path),
        description=description,
    )


def _route(path: Path, backend: str) -> tuple[str, gguf.GGUFInfo | None]:
    """The backend for a real file or directory, and its GGUF header if it has one."""
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnprocessableRequest(
                f"{str(path)!r} is a directory but not an MLX model (no config.json)", param="path",
                code="not_a_model",
            )
        if backend == AUTO_BACKEND:
            backend = "mlx"
        _check_format(path, backend, ModelFormat.mlx)
        return backend, None
    try:
        info = gguf.read(path)
    except gguf.GGUFError as e:
        raise UnprocessableRequest(f"not a model file: {e}", param="path", code="not_a_model") from e
    except OSError as e:
        raise UnprocessableRequest(f"cannot read {str(path)!r}: {e.strerror}", param="path", code="not_a_model") from e
    if backend == AUTO_BACKEND:
        try:
            routed = load_map().backend_for(info.architecture)
        except RoutingError as e:
            raise UnprocessableRequest(str(e), param="backend") from e
        if routed is None:
            raise UnprocessableRequest(
                f"no backend is mapped for architecture {info.architecture!r} (config/backends.yaml)",
                param="backend", code="unknown_backend",
            )
        backend = routed
    _check_format(path, backend, ModelFormat.gguf)
    return backend, info


def _directory_architecture(path: str) -> str | None:
    """An MLX model directory's architecture: its config.json's ``model_type``."""
    config = Path(path) / "config.json"
    if path.startswith(FAKE_SCHEME) or not config.is_file():
        return None
    try:
        kind = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def _check_format(path: Path, backend: str, fmt: ModelFormat) -> None:
    known = BACKENDS.get(backend)
    if known is None:
        what = "MLX model directories" if fmt is ModelFormat.mlx else "this model"
        raise UnprocessableRequest(
            f"backend {backend!r}, needed for {what}, is not available in this build "
            f"(available: {', '.join(BACKENDS)})", param="backend", code="unknown_backend",
        )
    if known.format not in (fmt, ModelFormat.any):
        raise UnprocessableRequest(
            f"backend {backend!r} loads {known.format.value} models; {str(path)!r} is {fmt.value}",
            param="backend", code="backend_mismatch",
        )
    missing = known.missing()
    if missing is not None:
        raise UnprocessableRequest(missing, param="backend", code="backend_unavailable")


def _max_batch(
    value: object, info: gguf.GGUFInfo | None, entry: ModelConfig, defaults: ModelDefaults, budget: int | None
) -> int:
    """The model's max_batch: as set, or for "auto" sized to the memory budget."""
    if value != "auto":
        return int(value)  # type: ignore[call-overload]
    ctx_size = entry.ctx_size if entry.ctx_size is not None else defaults.ctx_size
    kv_unified = entry.kv_unified if entry.kv_unified is not None else defaults.kv_unified
    per_cell = info.kv_bytes_per_token() if info is not None else None
    return memory.auto_max_batch(ctx_size, kv_unified, per_cell, budget)


def _estimate(path: str, info: gguf.GGUFInfo | None, engine: BackendConfig) -> int:
    if info is None:
        if path.startswith(FAKE_SCHEME):
            return 0
        weights = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        return memory.estimate(weights, 0, 0)
    per_cell = info.kv_bytes_per_token() or 0
    cells = memory.kv_cells(engine.n_ctx, engine.max_batch, engine.kv_unified)
    n_vocab = info.metadata.get("tokenizer.ggml.tokens", 0)
    scores = 0
    if engine.flash_attn is False and not engine.embeddings:
        n_batch = max(engine.n_batch, engine.max_batch)  # what the engine's steps may hold
        scores = memory.attention_scores_bytes(engine.n_ctx, n_batch, info.arch_int("attention.head_count") or 0)
    return memory.estimate(info.file_size, per_cell, cells, int(n_vocab or 0), engine.max_batch, scores)
