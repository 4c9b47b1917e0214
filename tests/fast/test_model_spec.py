"""From a model entry to its spec: the GGUF header, backend routing by architecture, sampling
defaults in layers, the memory estimate, and the request's values over all of them."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from axserving import model_store
from axserving.config import ModelConfig, ModelDefaults, SamplingDefaults
from axserving.errors import UnprocessableRequest
from axserving.models import gguf, memory
from axserving.models.routing import BackendMap, RoutingError, load_map, parse_map
from axserving.models.spec import resolve
from axserving.protocol import ChatCompletionRequest, sampling_params


def write_gguf(path: Path, metadata: dict[str, Any], version: int = 3) -> Path:
    """A header-only GGUF file (what the front reads), with one string array (a vocabulary)."""

    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    body = b""
    for key, value in metadata.items():
        body += s(key)
        if isinstance(value, bool):
            body += struct.pack("<I?", 7, value)
        elif isinstance(value, int):
            body += struct.pack("<Iq", 11, value)
        elif isinstance(value, float):
            body += struct.pack("<If", 6, value)
        elif isinstance(value, str):
            body += struct.pack("<I", 8) + s(value)
        elif isinstance(value, list):  # of strings
            body += struct.pack("<IIQ", 9, 8, len(value)) + b"".join(s(v) for v in value)
        else:
            raise TypeError(value)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", version, 0, len(metadata)) + body + b"\0" * 1000)
    return path


LLAMA = {
    "general.architecture": "llama",
    "general.name": "Tiny",
    "llama.block_count": 4,
    "llama.embedding_length": 64,
    "llama.attention.head_count": 4,
    "llama.attention.head_count_kv": 2,
    "tokenizer.ggml.tokens": ["a", "b", "c"],
}


def test_header_fields_and_kv_size(tmp_path: Path) -> None:
    info = gguf.read(write_gguf(tmp_path / "m.gguf", {**LLAMA, "general.sampling.temp": 0.5}))
    assert info.architecture == "llama" and info.metadata["tokenizer.ggml.tokens"] == 3
    assert info.kv_bytes_per_token() == 4 * 2 * (16 + 16) * 2  # layers x kv heads x (k+v dims) x f16
    assert info.sampling() == {"temperature": 0.5}


def test_damaged_headers_are_errors_not_hangs(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 40))
    with pytest.raises(gguf.GGUFError, match="damaged"):
        gguf.read(tmp_path / "bad")
    (tmp_path / "old").write_bytes(b"GGUF" + struct.pack("<I", 1))
    with pytest.raises(gguf.GGUFError, match="too old"):
        gguf.read(tmp_path / "old")
    whole = write_gguf(tmp_path / "whole.gguf", LLAMA).read_bytes()
    (tmp_path / "cut").write_bytes(whole[:60])
    with pytest.raises(gguf.GGUFError, match="ends early"):
        gguf.read(tmp_path / "cut")


def test_routing_exact_then_longest_prefix_then_default() -> None:
    m = parse_map({"default": "d", "exact": {"qwen2": "x"}, "prefix": {"qwen": "p", "qwen3": "q"}}, "t")
    assert [m.backend_for(a) for a in ("qwen2", "qwen3moe", "qwen1", "gpt2", None)] == ["x", "q", "p", "d", "d"]
    assert BackendMap().backend_for("llama") is None
    with pytest.raises(RoutingError):
        parse_map({"exact": ["llama"]}, "t")
    shipped = load_map()  # config/backends.yaml
    assert shipped.backend_for("llama") == "llama_cpp" and shipped.backend_for("gemma3") == "llama_cpp"


def test_auto_backend_and_sampling_layers(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", {
        **LLAMA, "general.sampling.temp": 0.6, "general.sampling.top_k": 20, "general.sampling.top_p": 0.95,
    })
    spec = resolve(
        ModelConfig(id="m", path=str(path), sampling=SamplingDefaults(top_k=5, max_tokens=64)),
        ModelDefaults(), str(tmp_path),
    )
    assert spec.backend == "llama_cpp" and spec.architecture == "llama" and spec.description == "Tiny"
    # The entry's own values first, then the file's recommendations.
    assert spec.sampling == SamplingDefaults(temperature=0.6, top_p=0.95, top_k=5, max_tokens=64)
    req = ChatCompletionRequest(messages=[], temperature=1.3)
    params = sampling_params(req).resolve(spec.sampling, default_max_tokens=2048)
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (1.3, 0.95, 5, 64)
    # Nothing anywhere: OpenAI's defaults.
    bare = sampling_params(ChatCompletionRequest(messages=[])).resolve(SamplingDefaults(), 2048)
    assert (bare.temperature, bare.top_p, bare.top_k, bare.max_tokens) == (1.0, 1.0, 0, 2048)


def test_a_files_out_of_range_recommendation_is_ignored(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", {**LLAMA, "general.sampling.temp": 9.0})
    spec = resolve(ModelConfig(id="m", path=str(path)), ModelDefaults(), str(tmp_path))
    assert spec.sampling == SamplingDefaults()


def test_entry_settings_override_model_defaults(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", LLAMA)
    defaults = ModelDefaults(ctx_size=1000, max_batch=4, threads=3, idle_timeout_secs=60)
    spec = resolve(ModelConfig(id="m", path=str(path), ctx_size=512, kv_unified=True), defaults, str(tmp_path))
    e = spec.engine
    assert (e.n_ctx, e.max_batch, e.n_threads, e.kv_unified, spec.idle_timeout_secs) == (512, 4, 3, True, 60)
    assert (e.prefill_slowdown, e.prefill_stall_ms, e.flash_attn, e.draft_tokens) == (4.0, 500, None, 0)
    drafting = resolve(ModelConfig(id="m", path=str(path)), ModelDefaults(draft_tokens=6), str(tmp_path))
    assert drafting.engine.draft_tokens == 6
    assert resolve(ModelConfig(id="m", path=str(path), draft_tokens=0), ModelDefaults(draft_tokens=6),
                   str(tmp_path)).engine.draft_tokens == 0
    for setting, want in ((False, False), (True, True)):
        fa = resolve(ModelConfig(id="m", path=str(path), flash_attn=setting), defaults, str(tmp_path))
        assert fa.engine.flash_attn is want
    paced = resolve(ModelConfig(id="m", path=str(path), prefill_slowdown=0), ModelDefaults(prefill_slowdown=8), str(tmp_path))
    assert paced.engine.prefill_slowdown == 0.0
    assert resolve(ModelConfig(id="m", path=str(path)), ModelDefaults(prefill_slowdown=8), str(tmp_path)).engine.prefill_slowdown == 8.0
    # Unified KV: ctx_size cells once; split: per sequence (rounded up to llama.cpp's 256).
    per_token = 4 * 2 * 32 * 2
    assert spec.memory_bytes == memory.estimate(path.stat().st_size, per_token, 512, 3, 4)
    split = resolve(ModelConfig(id="m", path=str(path)), defaults, str(tmp_path))
    assert split.memory_bytes == memory.estimate(path.stat().st_size, per_token, 1024 * 4, 3, 4)
    # Without flash attention, a step's attention scores too: ctx x batch x heads x f32.
    plain = resolve(ModelConfig(id="m", path=str(path), flash_attn=False), defaults, str(tmp_path))
    assert plain.memory_bytes == split.memory_bytes + 1024 * 512 * 4 * 4
    given = resolve(ModelConfig(id="m", path=str(path), memory_bytes="1.5GiB"), defaults, str(tmp_path))
    assert given.memory_bytes == int(1.5 * 2**30) and not given.memory_estimated


def test_max_batch_auto_fits_the_configured_memory_budget(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", LLAMA)  # 512 bytes of KV a token
    defaults = ModelDefaults(ctx_size=4096)
    roomy = resolve(ModelConfig(id="m", path=str(path)), defaults, str(tmp_path), memory_budget=1 << 40)
    assert roomy.engine.max_batch == memory.AUTO_MAX_BATCH
    # A quarter of 16 MiB holds 4096 x 512 bytes of KV twice: 2 sequences, not the machine's 16.
    tight = resolve(ModelConfig(id="m", path=str(path)), defaults, str(tmp_path), memory_budget=16 << 20)
    assert tight.engine.max_batch == 2


def test_backend_that_cannot_load_the_file(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", LLAMA)
    mlx_dir = tmp_path / "mlx-model"
    mlx_dir.mkdir()
    (mlx_dir / "config.json").write_text("{}")
    assert resolve(ModelConfig(id="m", path=str(mlx_dir)), ModelDefaults(), str(tmp_path)).backend == "mlx"
    with pytest.raises(UnprocessableRequest, match="loads mlx models"):
        resolve(ModelConfig(id="m", path=str(path), backend="mlx"), ModelDefaults(), str(tmp_path))
    with pytest.raises(UnprocessableRequest, match="'mlx' does not serve embeddings") as e:
        resolve(ModelConfig(id="m", path=str(mlx_dir), enable_embeddings=True), ModelDefaults(), str(tmp_path))
    assert e.value.code == "embeddings_unsupported"
    with pytest.raises(UnprocessableRequest, match="loads gguf models"):
        resolve(ModelConfig(id="m", path=str(mlx_dir), backend="llama_cpp"), ModelDefaults(), str(tmp_path))
    assert resolve(ModelConfig(id="m", path=str(path), backend="fake"), ModelDefaults(), str(tmp_path)).backend == "fake"


def test_an_mlx_directory_without_the_mlx_extra_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlx_lm" else real(name, *a))
    mlx_dir = tmp_path / "mlx-model"
    mlx_dir.mkdir()
    (mlx_dir / "config.json").write_text("{}")
    with pytest.raises(UnprocessableRequest, match=r"backend 'mlx' needs mlx_lm: pip install 'axserving\[mlx\]'") as e:
        resolve(ModelConfig(id="m", path=str(mlx_dir)), ModelDefaults(), str(tmp_path))
    assert e.value.code == "backend_unavailable"


def test_the_packaged_model_brings_its_recommended_sampling(tmp_path: Path) -> None:
    cached = model_store.cached_path(model_store.DEFAULT_MODEL, tmp_path)
    write_gguf(cached, LLAMA)  # stands in for the verified file (resolve does not re-verify it)
    spec = resolve(ModelConfig(id="default"), ModelDefaults(), str(tmp_path))
    assert spec.path == str(cached)
    assert spec.sampling == SamplingDefaults(temperature=0.2, top_p=0.9)
    own = resolve(ModelConfig(id="default", sampling=SamplingDefaults(temperature=0.0)), ModelDefaults(), str(tmp_path))
    assert own.sampling == SamplingDefaults(temperature=0.0, top_p=0.9)
