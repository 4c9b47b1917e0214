"""``axserving models convert``: a GGUF file into an MLX model directory, offline.

MLX reads GGUF tensors itself (``mx.load``): Q4_0, Q4_1 and Q8_0 blocks become MLX's affine
quantized layout (packed ``weight``, ``scales``, ``biases``, groups of 32) without dequantizing,
and F16/F32 tensors stay as they are. What this module adds:

- the tensor names, from llama.cpp's (``blk.N.attn_q``) to the Hugging Face names mlx-lm's model
  classes load (``model.layers.N.self_attn.q_proj``);
- the rows of Q and K put back in Hugging Face's order: llama.cpp's converter permutes them for its
  rotary embedding, and quantized rows can be moved as they are (each row is its own groups);
- ``config.json`` from the GGUF metadata, with the quantization of each layer;
- ``tokenizer.json`` and ``tokenizer_config.json`` (the chat template included) built from the
  vocabulary in the metadata by transformers' GGUF tokenizer builders, which need no torch.

Needs the ``mlx`` extra (``pip install -e '.[mlx]'``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

# llama.cpp's per-block tensor names → the Hugging Face module they belong to.
_LLAMA_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
SUPPORTED = ("llama",)
GROUP = 32  # every GGUF block type MLX reads has blocks of 32 weights

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class ConvertError(Exception):
    """The file cannot be converted; the message says why, for the operator."""


def _plain(value: Any) -> Any:
    import mlx.core as mx

    if isinstance(value, mx.array):
        return value.tolist() if value.ndim else value.item()
    return value


def _unpermute(x: Any, heads: int) -> Any:
    """Undo llama.cpp's row permutation of a Q or K projection (its rotary pairs adjacent rows;
    Hugging Face's rotates the two halves of each head)."""
    rows = x.shape[0]
    return x.reshape(heads, rows // heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _tokenizer(meta: dict[str, Any], out: Path) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # not its "PyTorch was not found" notice
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        _SPECIAL_TOKENS,
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    grouped = {
        group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    vocab, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if "tokens" not in vocab:
        raise ConvertError("the file has no vocabulary (tokenizer.ggml.tokens)")
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None:
            config[name] = vocab["tokens"][token_id]
    try:
        backend, _ = convert_gguf_tokenizer(meta["general.architecture"], vocab)
    except Exception as e:  # noqa: BLE001 — transformers raises several kinds for an unknown vocabulary
        raise ConvertError(f"cannot build a tokenizer from this file's vocabulary: {e}") from e
    backend.save(str(out / "tokenizer.json"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))


def convert(source: Path, out: Path, progress: Progress | None = None, force: bool = False) -> Path:
    """Write the MLX model directory ``out`` from the GGUF file ``source``; ``out``."""
    try:
        import mlx.core as mx
    except ImportError as e:
        raise ConvertError("converting needs MLX: pip install -e '.[mlx]'") from e

    def tick(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(stage, done, total)

    if not source.is_file():
        raise ConvertError(f"{source}: no such file")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ConvertError(f"{out} exists and is not empty (--force replaces it)")
        shutil.rmtree(out)
    tick("reading", 0, 1)
    try:
        tensors, raw_meta = mx.load(str(source), return_metadata=True)
    except Exception as e:  # noqa: BLE001 — MLX raises ValueError/RuntimeError for what it cannot read
        raise ConvertError(
            f"{source}: MLX cannot read it ({e}); Q4_0, Q4_1, Q8_0, F16 and F32 tensors convert, K-quants do not"
        ) from e
    tick("reading", 1, 1)
    meta = {k: _plain(v) for k, v in raw_meta.items()}
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED:
        raise ConvertError(f"{source}: architecture {arch!r} is not supported yet (supported: {', '.join(SUPPORTED)})")

    def key(name: str) -> Any:
        try:
            return meta[f"{arch}.{name}"]
        except KeyError:
            raise ConvertError(f"{source}: the metadata has no {arch}.{name}") from None

    n_head, n_kv = int(key("attention.head_count")), int(key("attention.head_count_kv"))
    weights: dict[str, Any] = {}
    names = sorted(tensors)
    for i, name in enumerate(names):
        parts = name.split(".")
        value = tensors[name]
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LLAMA_BLOCK:
            module = f"model.layers.{parts[1]}.{_LLAMA_BLOCK[parts[2]]}"
            if parts[2] == "attn_q":
                value = _unpermute(value, n_head)
            elif parts[2] == "attn_k":
                value = _unpermute(value, n_kv)
        elif len(parts) == 2 and parts[0] in _LLAMA_TOP:
            module = _LLAMA_TOP[parts[0]]
        elif parts[0] == "rope_freqs":
            continue  # recomputed by the model from rope_theta
        else:
            raise ConvertError(f"{source}: unexpected tensor {name!r}")
        weights[f"{module}.{parts[-1]}"] = value
        tick("tensors", i + 1, len(names))

    # Each quantized layer's bits, from its packed width: in_features = groups × 32.
    bits: dict[str, int] = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            module = name.removesuffix(".scales")
            packed = weights[f"{module}.weight"].shape[-1]
            bits[module] = packed * 32 // (scales.shape[-1] * GROUP)
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": int(key("embedding_length")),
        "num_hidden_layers": int(key("block_count")),
        "intermediate_size": int(key("feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length")),
        "vocab_size": int(weights["model.embed_tokens.weight"].shape[0]),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if bits:
        common = Counter(bits.values()).most_common(1)[0][0]
        quantization: dict[str, Any] = {"group_size": GROUP, "bits": common}
        for module, b in bits.items():
            if b != common:
                quantization[module] = {"group_size": GROUP, "bits": b}
        config["quantization"] = quantization

    out.mkdir(parents=True, exist_ok=True)
    tick("tokenizer", 0, 1)
    _tokenizer(meta, out)
    tick("tokenizer", 1, 1)
    tick("writing", 0, 1)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    tick("writing", 1, 1)
    return out
