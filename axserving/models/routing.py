"""Which backend serves a model when its entry says ``backend: auto``.

A GGUF file is looked up by its ``general.architecture`` in ``config/backends.yaml``: an exact
match, then the longest matching prefix, then ``default``. An MLX model directory (config.json
and safetensors) goes to the ``mlx`` backend. A ``fake://`` path is the test double.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from axserving.config import PACKAGE_ROOT

BACKENDS_FILE = PACKAGE_ROOT / "config" / "backends.yaml"


class RoutingError(ValueError):
    """The map is malformed, or names no backend for this model."""


@dataclass(frozen=True)
class BackendMap:
    default: str | None = None
    exact: dict[str, str] = field(default_factory=dict)
    prefix: dict[str, str] = field(default_factory=dict)

    def backend_for(self, architecture: str | None) -> str | None:
        if architecture:
            if architecture in self.exact:
                return self.exact[architecture]
            matches = [p for p in self.prefix if architecture.startswith(p)]
            if matches:
                return self.prefix[max(matches, key=len)]
        return self.default


def parse_map(raw: object, where: str) -> BackendMap:
    if not isinstance(raw, dict) or set(raw) - {"default", "exact", "prefix"}:
        raise RoutingError(f"{where}: expected a mapping with 'default', 'exact' and 'prefix'")
    for key in ("exact", "prefix"):
        table = raw.get(key) or {}
        if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
            raise RoutingError(f"{where}: '{key}' must map architecture names to backend names")
    default = raw.get("default")
    if default is not None and not isinstance(default, str):
        raise RoutingError(f"{where}: 'default' must be a backend name")
    return BackendMap(default, dict(raw.get("exact") or {}), dict(raw.get("prefix") or {}))


@functools.cache
def load_map(path: Path = BACKENDS_FILE) -> BackendMap:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RoutingError(f"cannot read the backend map {path}: {e}") from e
    return parse_map(raw, str(path))
