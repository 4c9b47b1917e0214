"""The metadata of a GGUF file, read from its header alone (no tensor data, no numpy).

What the front needs before it starts an engine: the architecture (which backend serves it),
the shapes that size its KV cache (the memory estimate), the context it was trained for, and
the author's sampling recommendations (``general.sampling.*``). Arrays (the tokenizer's
vocabulary) are skipped, not decoded. Format: ggml's ``docs/gguf.md`` (versions 2 and 3).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

MAGIC = b"GGUF"

# value type → struct format (fixed-size scalars)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_KEYS = 1 << 20  # a corrupt count must not make us loop for ever


class GGUFError(ValueError):
    """Not a GGUF file, or a damaged header."""


@dataclass(frozen=True)
class GGUFInfo:
    path: str
    file_size: int
    metadata: dict[str, Any] = field(repr=False)  # scalars and strings; arrays as their length

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def arch_int(self, key: str) -> int | None:
        value = self.metadata.get(f"{self.architecture}.{key}")
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def kv_bytes_per_token(self) -> int | None:
        """Bytes of KV cache per token position (all layers, K and V, f16), if the header says
        enough: the shapes llama.cpp sizes its cache from."""
        n_layer = self.arch_int("block_count")
        n_embd = self.arch_int("embedding_length")
        n_head = self.arch_int("attention.head_count")
        if not (n_layer and n_embd and n_head):
            return None
        n_head_kv = self.arch_int("attention.head_count_kv") or n_head
        k_dim = self.arch_int("attention.key_length") or n_embd // n_head
        v_dim = self.arch_int("attention.value_length") or n_embd // n_head
        return n_layer * n_head_kv * (k_dim + v_dim) * 2

    def sampling(self) -> dict[str, float]:
        """The author's recommended sampling settings written in the file (llama.cpp's keys)."""
        names = {
            "temp": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
            "penalty_repeat": "repeat_penalty",
        }
        out: dict[str, float] = {}
        for key, name in names.items():
            value = self.metadata.get(f"general.sampling.{key}")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            # Stored as f32: 0.95 reads back as 0.949999988...; six digits is what was meant.
            out[name] = float(f"{value:.6g}") if isinstance(value, float) else value
        return out


def is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def read(path: Path) -> GGUFInfo:
    """The header's metadata. Raises :class:`GGUFError` (or ``OSError`` if unreadable)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        if f.read(4) != MAGIC:
            raise GGUFError(f"{path} is not a GGUF file (no GGUF magic)")
        version = _unpack(f, "<I")
        if version < 2:
            raise GGUFError(f"{path}: GGUF version {version} is too old (2 or later is read)")
        _n_tensors, n_kv = _unpack(f, "<Q"), _unpack(f, "<Q")
        if n_kv > _MAX_KEYS:
            raise GGUFError(f"{path}: damaged header ({n_kv} metadata keys)")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = _string(f)
            metadata[key] = _value(f, _unpack(f, "<I"))
    return GGUFInfo(str(path), size, metadata)


def _unpack(f: BinaryIO, fmt: str) -> Any:
    n = struct.calcsize(fmt)
    raw = f.read(n)
    if len(raw) != n:
        raise GGUFError(f"{getattr(f, 'name', 'file')}: header ends early")
    return struct.unpack(fmt, raw)[0]


def _string(f: BinaryIO) -> str:
    n = _unpack(f, "<Q")
    if n > 1 << 26:
        raise GGUFError(f"{getattr(f, 'name', 'file')}: damaged header (a {n}-byte string)")
    raw = f.read(n)
    if len(raw) != n:
        raise GGUFError(f"{getattr(f, 'name', 'file')}: header ends early")
    return raw.decode("utf-8", "replace")


def _value(f: BinaryIO, vtype: int) -> Any:
    if vtype in _SCALARS:
        return _unpack(f, _SCALARS[vtype])
    if vtype == _STRING:
        return _string(f)
    if vtype == _ARRAY:
        item, count = _unpack(f, "<I"), _unpack(f, "<Q")
        if item in _SCALARS:
            f.seek(struct.calcsize(_SCALARS[item]) * count, 1)
        elif item == _STRING:
            for _ in range(count):
                f.seek(_unpack(f, "<Q"), 1)
        else:
            for _ in range(count):
                _value(f, item)
        return count
    raise GGUFError(f"{getattr(f, 'name', 'file')}: damaged header (value type {vtype})")
