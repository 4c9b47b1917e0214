"""Typed settings, loaded and validated once at start-up.

Precedence: CLI flags > ``AXS_*`` environment > YAML file (``--config``, ``$AXS_CONFIG``, then
``config/serving.yaml``) > built-in defaults. Every key is documented in ``config/serving.yaml``.
A bad value raises :class:`ConfigError` naming the key, the value and where it came from.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from engine_proc.spec import (
    DEFAULT_DRAFT_TOKENS,
    DEFAULT_FLASH_ATTN,
    DEFAULT_PREFILL_SLOWDOWN,
    DEFAULT_PREFILL_STALL_MS,
)

Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
RingBytes = Annotated[int, msgspec.Meta(ge=65536, le=1 << 30)]
ModelId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")]

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = PACKAGE_ROOT / "config" / "serving.yaml"


class LogFormat(str, enum.Enum):
    text = "text"
    json = "json"


class LogLevel(str, enum.Enum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


_STRICT = dict(frozen=True, forbid_unknown_fields=True)


class RestSettings(msgspec.Struct, **_STRICT):
    host: str = "127.0.0.1"
    port: Port = 18080
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 8 << 20
    body_timeout_secs: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    header_timeout_secs: Annotated[float, msgspec.Meta(gt=0)] = 30.0


AUTO_BACKEND = "auto"  # picked by the model: GGUF architecture (config/backends.yaml), MLX directory


class SamplingDefaults(msgspec.Struct, **_STRICT):
    """A model's defaults for what a request leaves out (a request's own values win)."""

    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_k: NonNegative | None = None  # 0: off
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0, le=10)] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=32768)] | None = None


CtxSize = Annotated[int, msgspec.Meta(ge=64, le=1 << 20)]
BatchSize = Annotated[int, msgspec.Meta(ge=1, le=65536)]
MaxBatch = Annotated[int, msgspec.Meta(ge=1, le=256)]
# "auto": sized to the machine's memory when the model is resolved (axserving.models.memory).
MaxBatchSetting = MaxBatch | Literal["auto"]
MemorySize = int | str  # bytes, or "8GiB", "512MB", ...
# 0 (off), or at least 1: checked by check_prefill_slowdown, as msgspec cannot say "0 or >= 1".
PrefillSlowdown = Annotated[float, msgspec.Meta(ge=0, le=1000)]
StallMs = Annotated[int, msgspec.Meta(ge=0, le=600_000)]
FlashAttn = bool | Literal["auto"]  # "auto": llama.cpp decides (on wherever it can run)
# 0: no prompt-lookup drafting. At most 32: a sequence's rows are computed as one at a time
# below 64 rows a step (engine_proc.backends.lookup).
DraftTokens = Annotated[int, msgspec.Meta(ge=0, le=32)]


class ModelDefaults(msgspec.Struct, **_STRICT):
    """Per-model settings every model inherits unless its entry sets its own."""

    backend: str = AUTO_BACKEND
    threads: NonNegative = 0  # 0: all cores
    ctx_size: CtxSize = 4096
    batch_size: BatchSize = 512
    max_batch: MaxBatchSetting = "auto"
    kv_unified: bool = False
    prefill_slowdown: PrefillSlowdown = DEFAULT_PREFILL_SLOWDOWN
    prefill_stall_ms: StallMs = DEFAULT_PREFILL_STALL_MS
    flash_attn: FlashAttn = "auto" if DEFAULT_FLASH_ATTN is None else DEFAULT_FLASH_ATTN
    draft_tokens: DraftTokens = DEFAULT_DRAFT_TOKENS
    backend_options: dict[str, str] = {}
    idle_timeout_secs: NonNegative = 0  # 0: never unloaded for idleness


class ModelConfig(msgspec.Struct, **_STRICT):
    """One model to serve: an entry of ``models:``, or the body of ``POST /v1/models``."""

    id: ModelId
    path: str | None = None  # None: the packaged default model
    backend: str | None = None
    aliases: tuple[ModelId, ...] = ()
    pinned: bool = False  # never evicted (idle, LRU or memory)
    threads: NonNegative | None = None
    ctx_size: CtxSize | None = None
    batch_size: BatchSize | None = None
    max_batch: MaxBatchSetting | None = None
    kv_unified: bool | None = None
    prefill_slowdown: PrefillSlowdown | None = None
    prefill_stall_ms: StallMs | None = None
    flash_attn: FlashAttn | None = None
    draft_tokens: DraftTokens | None = None
    backend_options: dict[str, str] | None = None
    idle_timeout_secs: NonNegative | None = None
    memory_bytes: MemorySize | None = None  # replaces the estimate made from the file
    sampling: SamplingDefaults = SamplingDefaults()
    enable_embeddings: bool = False  # serve /v1/embeddings (pooled vectors) instead of generation
    pooling: Literal["mean", "cls", "last"] | None = None  # None: the model's own, else mean


class LifecycleSettings(msgspec.Struct, **_STRICT):
    max_loaded_models: Positive = 16
    max_memory_bytes: MemorySize | None = None  # None: 75% of the machine's RAM
    allowed_dirs: tuple[str, ...] = ()  # runtime loads only from under these (empty: anywhere)
    drain_timeout_secs: Annotated[float, msgspec.Meta(ge=0)] = 30.0


class OverloadPolicy(str, enum.Enum):
    queue = "queue"  # wait in the bounded queue; 429 when it is full
    reject = "reject"  # no waiting: 429 as soon as no slot is free
    shed_oldest = "shed_oldest"  # when the queue is full, the oldest waiter gets a 503 instead


class SchedulerSettings(msgspec.Struct, **_STRICT):
    max_inflight: Positive = 64
    max_queue: NonNegative = 128
    max_wait_ms: Positive = 120_000
    overload_policy: OverloadPolicy = OverloadPolicy.queue
    per_model_max_inflight: NonNegative = 0  # 0: the model's max_batch + engine_lookahead
    engine_lookahead: NonNegative = 2
    aging_ms: Positive = 5_000
    target_p99_ms: NonNegative = 0  # 0: no AIMD
    default_max_tokens: Annotated[int, msgspec.Meta(ge=1, le=32768)] = 2048
    request_timeout_secs: Positive = 120


class EngineSettings(msgspec.Struct, **_STRICT):
    startup_timeout_secs: Positive = 120
    max_restarts: NonNegative = 5
    restart_backoff_ms: NonNegative = 250
    restart_backoff_max_ms: NonNegative = 16_000
    circuit_cooldown_secs: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    request_ring_bytes: RingBytes = 4 << 20
    event_ring_bytes: RingBytes = 4 << 20
    nice: Annotated[int, msgspec.Meta(ge=0, le=19)] = 10
    heartbeat_timeout_secs: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    heartbeat_floor_secs: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    heartbeat_step_factor: Annotated[float, msgspec.Meta(ge=1)] = 4.0


class AuthSettings(msgspec.Struct, **_STRICT):
    allow_no_auth: bool = False


class LogSettings(msgspec.Struct, **_STRICT):
    level: LogLevel = LogLevel.info
    format: LogFormat = LogFormat.text


class ModelStoreSettings(msgspec.Struct, **_STRICT):
    cache_dir: str = "~/.cache/axserving/models"


class Settings(msgspec.Struct, **_STRICT):
    rest: RestSettings = RestSettings()
    models: tuple[ModelConfig, ...] = (ModelConfig(id="default"),)
    default_model: ModelId | None = None  # None: the first of `models`
    model_defaults: ModelDefaults = ModelDefaults()
    lifecycle: LifecycleSettings = LifecycleSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    engine: EngineSettings = EngineSettings()
    auth: AuthSettings = AuthSettings()
    logging: LogSettings = LogSettings()
    model_store: ModelStoreSettings = ModelStoreSettings()
    # Secrets come from the environment only (AXS_API_KEY), never from a file or a flag.
    api_keys: tuple[str, ...] = ()


# Environment variable → dotted key. Names follow the reference server's where it has one.
ENV_KEYS: dict[str, str] = {
    "AXS_REST_HOST": "rest.host",
    "AXS_REST_PORT": "rest.port",
    "AXS_BODY_TIMEOUT_SECS": "rest.body_timeout_secs",
    "AXS_HEADER_TIMEOUT_SECS": "rest.header_timeout_secs",
    "AXS_MODEL_PATH": "model.path",
    "AXS_MODEL_ID": "model.id",
    "AXS_DEFAULT_MODEL": "default_model",
    "AXS_BACKEND": "model_defaults.backend",
    "AXS_THREADS": "model_defaults.threads",
    "AXS_CTX_SIZE": "model_defaults.ctx_size",
    "AXS_MAX_BATCH": "model_defaults.max_batch",
    "AXS_BATCH_SIZE": "model_defaults.batch_size",
    "AXS_KV_UNIFIED": "model_defaults.kv_unified",
    "AXS_PREFILL_SLOWDOWN": "model_defaults.prefill_slowdown",
    "AXS_PREFILL_STALL_MS": "model_defaults.prefill_stall_ms",
    "AXS_FLASH_ATTN": "model_defaults.flash_attn",
    "AXS_DRAFT_TOKENS": "model_defaults.draft_tokens",
    "AXS_IDLE_TIMEOUT_SECS": "model_defaults.idle_timeout_secs",
    "AXS_MAX_LOADED_MODELS": "lifecycle.max_loaded_models",
    "AXS_MAX_MEMORY_BYTES": "lifecycle.max_memory_bytes",
    "AXS_MODEL_ALLOWED_DIRS": "lifecycle.allowed_dirs",
    "AXS_DRAIN_TIMEOUT_SECS": "lifecycle.drain_timeout_secs",
    "AXS_SCHED_MAX_INFLIGHT": "scheduler.max_inflight",
    "AXS_SCHED_MAX_QUEUE": "scheduler.max_queue",
    "AXS_SCHED_MAX_WAIT_MS": "scheduler.max_wait_ms",
    "AXS_OVERLOAD_POLICY": "scheduler.overload_policy",
    "AXS_PER_MODEL_MAX_INFLIGHT": "scheduler.per_model_max_inflight",
    "AXS_TARGET_P99_MS": "scheduler.target_p99_ms",
    "AXS_DEFAULT_MAX_TOKENS": "scheduler.default_max_tokens",
    "AXS_REQUEST_TIMEOUT_SECS": "scheduler.request_timeout_secs",
    "AXS_ENGINE_STARTUP_TIMEOUT_SECS": "engine.startup_timeout_secs",
    "AXS_ENGINE_MAX_RESTARTS": "engine.max_restarts",
    "AXS_ENGINE_NICE": "engine.nice",
    "AXS_ENGINE_HEARTBEAT_TIMEOUT_SECS": "engine.heartbeat_timeout_secs",
    "AXS_ALLOW_NO_AUTH": "auth.allow_no_auth",
    "AXS_LOG": "logging.level",
    "AXS_LOG_FORMAT": "logging.format",
    "AXS_MODEL_CACHE": "model_store.cache_dir",
}


class ConfigError(Exception):
    """A setting is missing, unknown or out of range. The message is meant for the operator."""


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {p!r} must be a mapping")
    node[leaf] = value


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for p in dotted.split("."):
        node = node[int(p)] if isinstance(node, list) else node[p]
    return node


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and key != "model_defaults.backend_options":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _parse_bool(raw: str) -> bool | str:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    return raw  # left for validation to reject, naming the key


def parse_flash_attn(raw: str) -> bool | str:
    """``on``/``off`` (or true/false, 1/0) as booleans; ``auto`` and anything else as given, for
    validation to accept or reject naming the key."""
    low = raw.strip().lower()
    return low if low == "auto" else _parse_bool(raw)


def config_file(cli_path: str | None, env: Mapping[str, str]) -> Path | None:
    if cli_path:
        return Path(cli_path)
    if env.get("AXS_CONFIG"):
        return Path(env["AXS_CONFIG"])
    for candidate in (Path("config/serving.yaml"), DEFAULT_CONFIG_FILE):
        if candidate.is_file():
            return candidate
    return None


def load_settings(
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_path: str | None = None,
    flags: Mapping[str, str] | None = None,
) -> Settings:
    """Merge the layers and validate. ``cli`` maps dotted keys to values given on the command line
    (``flags``: the flag each came from, for messages and the start-up report)."""
    return load_traced(cli, env, config_path, flags)[0]


def load_traced(
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_path: str | None = None,
    flags: Mapping[str, str] | None = None,
) -> tuple[Settings, dict[str, str]]:
    """:func:`load_settings`, and where each key set came from: a flag (``--port``), an
    environment variable (``$AXS_REST_PORT``) or a file's path. Keys not listed are defaults."""
    env = os.environ if env is None else env
    flags = flags or {}
    tree: dict[str, Any] = {}
    source: dict[str, str] = {}

    path = config_file(config_path, env)
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        for key, value in _flatten(loaded).items():
            _set(tree, key, value)
            source[key] = str(path)

    for name, key in ENV_KEYS.items():
        if name in env:
            raw = env[name]
            parsed: Any = raw
            if key == "auth.allow_no_auth":
                parsed = _parse_bool(raw)
            elif key == "model_defaults.flash_attn":
                parsed = parse_flash_attn(raw)
            elif key == "lifecycle.allowed_dirs":
                parsed = [d.strip() for d in raw.split(",") if d.strip()]
            _set(tree, key, parsed)
            source[key] = f"${name}"
    keys = [k.strip() for k in env.get("AXS_API_KEY", "").split(",") if k.strip()]
    tree["api_keys"] = keys

    for key, given in (cli or {}).items():
        if given is not None:
            _set(tree, key, given)
            source[key] = flags.get(key, "command line")

    _one_model_shorthand(tree, source)
    try:
        settings = msgspec.convert(tree, Settings, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(_explain(e, tree, source)) from e
    check(settings, source)
    if settings.api_keys:
        source["api_keys"] = "$AXS_API_KEY"
    return settings, source


def _one_model_shorthand(tree: dict[str, Any], source: dict[str, str]) -> None:
    """``--model``/``--model-id`` (``AXS_MODEL_PATH``/``AXS_MODEL_ID``): serve that one model,
    in place of the configured ``models`` list."""
    shorthand = tree.pop("model", None)
    if not shorthand:
        return
    if not isinstance(shorthand, dict) or set(shorthand) - {"path", "id"}:
        raise ConfigError(
            "invalid configuration: the 'model' section is gone: list models under 'models' "
            "and their shared settings under 'model_defaults' (see config/serving.yaml)"
        )
    entry = {"id": shorthand.get("id") or "default", "path": shorthand.get("path")}
    tree["models"] = [entry]
    if "default_model" in tree and not source.get("default_model", "").startswith(("$", "command")):
        del tree["default_model"]  # the file's default named one of the models replaced
    source["models"] = " and ".join(
        sorted({source.get(f"model.{k}", "") for k in shorthand} - {""})
    ) or "defaults"
    for k in shorthand:
        if f"model.{k}" in source:
            source[f"models.0.{k}"] = source[f"model.{k}"]


def parse_size(value: int | str, key: str) -> int:
    """Bytes from an int or a string such as ``8GiB``, ``512 MB`` or ``1.5G``."""
    from engine_proc.spec import size_bytes

    try:
        return size_bytes(value)
    except ValueError as e:
        raise ConfigError(f"invalid configuration: {key} = {value!r}: {e}") from None


def check_prefill_slowdown(value: float, key: str) -> None:
    if 0 < value < 1:
        raise ConfigError(
            f"invalid configuration: {key} = {value!r}: expected 0 (off) or at least 1 "
            "(how many times a decode-only step a step with a prompt chunk may take)"
        )


def check(settings: Settings, source: Mapping[str, str] | None = None) -> None:
    """What a struct's types cannot say: known backends, unique names, a default that exists."""
    from engine_proc.spec import BACKENDS

    source = source or {}
    where = f" (from {source.get('models', 'defaults')})"
    known = [AUTO_BACKEND, *BACKENDS]
    if settings.model_defaults.backend not in known:
        origin = source.get("model_defaults.backend", "defaults")
        raise ConfigError(
            f"invalid configuration: model_defaults.backend = {settings.model_defaults.backend!r} "
            f"(from {origin}): expected one of {', '.join(known)}"
        )
    check_prefill_slowdown(settings.model_defaults.prefill_slowdown, "model_defaults.prefill_slowdown")
    names: dict[str, str] = {}
    for i, m in enumerate(settings.models):
        if m.prefill_slowdown is not None:
            check_prefill_slowdown(m.prefill_slowdown, f"models.{i}.prefill_slowdown")
        if m.backend is not None and m.backend not in known:
            raise ConfigError(
                f"invalid configuration: models.{i}.backend = {m.backend!r}{where}: expected one of {', '.join(known)}"
            )
        if m.memory_bytes is not None:
            parse_size(m.memory_bytes, f"models.{i}.memory_bytes")
        for name in (m.id, *m.aliases):
            if name in names:
                raise ConfigError(f"invalid configuration: models.{i}: the name {name!r} is already used by {names[name]!r}{where}")
            names[name] = m.id
    if settings.default_model is not None and settings.default_model not in names:
        origin = source.get("default_model", "defaults")
        raise ConfigError(
            f"invalid configuration: default_model = {settings.default_model!r} (from {origin}): "
            f"no model of that name (models: {', '.join(names) or 'none'})"
        )
    if len(settings.models) > settings.lifecycle.max_loaded_models:
        raise ConfigError(
            f"invalid configuration: {len(settings.models)} models are listed but "
            f"lifecycle.max_loaded_models = {settings.lifecycle.max_loaded_models}"
        )
    if settings.lifecycle.max_memory_bytes is not None:
        parse_size(settings.lifecycle.max_memory_bytes, "lifecycle.max_memory_bytes")


def _explain(err: msgspec.ValidationError, tree: Mapping[str, Any], source: Mapping[str, str]) -> str:
    msg = str(err)
    if " - at `$." not in msg:
        return f"invalid configuration: {msg}"
    what, _, where = msg.rpartition(" - at `$.")
    key = where.rstrip("`").replace("[", ".").replace("]", "")
    try:
        value = repr(_get(tree, key))
    except (KeyError, TypeError):
        value = "(missing)"
    unknown = re.match(r"Object contains unknown field `([^`]+)`", what)
    if unknown:
        full = f"{key}.{unknown.group(1)}"
        return f"invalid configuration: unknown key {full!r} (from {source.get(full, 'the config file')})"
    origin = source.get(key, "defaults")
    return f"invalid configuration: {key} = {value} (from {origin}): {what}"


SECRET_KEYS = ("api_keys",)
_SECRET_WORDS = re.compile(r"(key|token|secret|password)", re.IGNORECASE)


def origin_kind(origin: str | None) -> str:
    """``flag``, ``env``, ``file`` or ``default``, for a source as :func:`load_traced` names it."""
    if not origin or origin == "defaults":
        return "default"
    if origin.startswith("$"):
        return "env"
    if origin.startswith("-") or origin == "command line":
        return "flag"
    return "file"


def _source_of(key: str, sources: Mapping[str, str]) -> str | None:
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        found = sources.get(".".join(parts[:n]))
        if found is not None:
            return found
    return None


def _mask(key: str, value: Any) -> Any:
    if key.split(".")[0] in SECRET_KEYS or _SECRET_WORDS.search(key.rsplit(".", 1)[-1]):
        if isinstance(value, list | tuple):
            return [f"***({len(v)} chars)" for v in value]
        return "***" if value else value
    return value


def settings_report(settings: Settings, sources: Mapping[str, str]) -> list[dict[str, Any]]:
    """Every effective setting, one entry per leaf key (list items by index): its value (secrets
    masked), and its source: ``flag``, ``env``, ``file`` or ``default`` with the flag, variable
    or file it came from."""
    rows: list[dict[str, Any]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value and not prefix.endswith("backend_options"):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
            return
        if isinstance(value, list | tuple) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
            return
        origin = _source_of(prefix, sources)
        kind = origin_kind(origin)
        if isinstance(value, tuple):
            value = list(value)
        rows.append({"key": prefix, "value": _mask(prefix, value), "source": kind,
                     "origin": origin if kind != "default" else None})

    walk("", msgspec.to_builtins(settings))
    return rows


def to_json(settings: Settings) -> bytes:
    return msgspec.json.encode(settings)


def from_json(raw: bytes | str) -> Settings:
    return msgspec.json.decode(raw, type=Settings)
