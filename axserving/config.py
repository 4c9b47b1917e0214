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
from typing import Annotated, Any

import msgspec
import yaml

Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
RingBytes = Annotated[int, msgspec.Meta(ge=65536, le=1 << 30)]
ModelId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")]

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = PACKAGE_ROOT / "config" / "serving.yaml"


class BackendName(str, enum.Enum):
    llama_cpp = "llama_cpp"
    fake = "fake"


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


class ModelSettings(msgspec.Struct, **_STRICT):
    path: str | None = None  # None: the packaged default model
    id: ModelId = "default"
    backend: BackendName = BackendName.llama_cpp
    threads: NonNegative = 0  # 0: all cores
    ctx_size: Annotated[int, msgspec.Meta(ge=64, le=1 << 20)] = 4096
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 512
    max_batch: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8
    kv_unified: bool = False
    backend_options: dict[str, str] = {}


class SchedulerSettings(msgspec.Struct, **_STRICT):
    max_inflight: Positive = 16
    max_queue: NonNegative = 128
    max_wait_ms: Positive = 120_000
    default_max_tokens: Annotated[int, msgspec.Meta(ge=1, le=32768)] = 2048
    request_timeout_secs: Positive = 120


class EngineSettings(msgspec.Struct, **_STRICT):
    startup_timeout_secs: Positive = 120
    max_restarts: NonNegative = 5
    restart_backoff_ms: NonNegative = 250
    restart_backoff_max_ms: NonNegative = 16_000
    request_ring_bytes: RingBytes = 4 << 20
    event_ring_bytes: RingBytes = 4 << 20
    nice: Annotated[int, msgspec.Meta(ge=0, le=19)] = 10
    heartbeat_timeout_secs: Annotated[float, msgspec.Meta(gt=0)] = 30.0


class AuthSettings(msgspec.Struct, **_STRICT):
    allow_no_auth: bool = False


class LogSettings(msgspec.Struct, **_STRICT):
    level: LogLevel = LogLevel.info
    format: LogFormat = LogFormat.text


class ModelStoreSettings(msgspec.Struct, **_STRICT):
    cache_dir: str = "~/.cache/axserving/models"


class Settings(msgspec.Struct, **_STRICT):
    rest: RestSettings = RestSettings()
    model: ModelSettings = ModelSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    engine: EngineSettings = EngineSettings()
    auth: AuthSettings = AuthSettings()
    logging: LogSettings = LogSettings()
    models: ModelStoreSettings = ModelStoreSettings()
    # Secrets come from the environment only (AXS_API_KEY), never from a file or a flag.
    api_keys: tuple[str, ...] = ()


# Environment variable → dotted key. Names follow the reference server's where it has one.
ENV_KEYS: dict[str, str] = {
    "AXS_REST_HOST": "rest.host",
    "AXS_REST_PORT": "rest.port",
    "AXS_MODEL_PATH": "model.path",
    "AXS_MODEL_ID": "model.id",
    "AXS_BACKEND": "model.backend",
    "AXS_THREADS": "model.threads",
    "AXS_CTX_SIZE": "model.ctx_size",
    "AXS_MAX_BATCH": "model.max_batch",
    "AXS_BATCH_SIZE": "model.batch_size",
    "AXS_KV_UNIFIED": "model.kv_unified",
    "AXS_SCHED_MAX_INFLIGHT": "scheduler.max_inflight",
    "AXS_SCHED_MAX_QUEUE": "scheduler.max_queue",
    "AXS_SCHED_MAX_WAIT_MS": "scheduler.max_wait_ms",
    "AXS_DEFAULT_MAX_TOKENS": "scheduler.default_max_tokens",
    "AXS_REQUEST_TIMEOUT_SECS": "scheduler.request_timeout_secs",
    "AXS_ENGINE_STARTUP_TIMEOUT_SECS": "engine.startup_timeout_secs",
    "AXS_ENGINE_MAX_RESTARTS": "engine.max_restarts",
    "AXS_ENGINE_NICE": "engine.nice",
    "AXS_ENGINE_HEARTBEAT_TIMEOUT_SECS": "engine.heartbeat_timeout_secs",
    "AXS_ALLOW_NO_AUTH": "auth.allow_no_auth",
    "AXS_LOG": "logging.level",
    "AXS_LOG_FORMAT": "logging.format",
    "AXS_MODEL_CACHE": "models.cache_dir",
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
        node = node[p]
    return node


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and key != "model.backend_options":
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
) -> Settings:
    """Merge the layers and validate. ``cli`` maps dotted keys to values given on the command line."""
    env = os.environ if env is None else env
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
            _set(tree, key, _parse_bool(raw) if key == "auth.allow_no_auth" else raw)
            source[key] = f"${name}"
    keys = [k.strip() for k in env.get("AXS_API_KEY", "").split(",") if k.strip()]
    tree["api_keys"] = keys

    for key, value in (cli or {}).items():
        if value is not None:
            _set(tree, key, value)
            source[key] = "command line"

    try:
        return msgspec.convert(tree, Settings, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(_explain(e, tree, source)) from e


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


def to_json(settings: Settings) -> bytes:
    return msgspec.json.encode(settings)


def from_json(raw: bytes | str) -> Settings:
    return msgspec.json.decode(raw, type=Settings)
