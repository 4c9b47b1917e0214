"""Backends: the real runtimes (llama_cpp) and the test double (fake)."""

from __future__ import annotations

from engine_proc.backends.base import Backend, BackendConfig

BACKENDS = ("llama_cpp", "fake")


def make_backend(name: str, config: BackendConfig) -> Backend:
    """Import lazily: the front never imports llama_cpp, and the fake needs nothing heavy."""
    if name == "llama_cpp":
        from engine_proc.backends.llama_cpp import LlamaCppBackend

        return LlamaCppBackend(config)
    if name == "fake":
        from engine_proc.backends.fake import FakeBackend

        return FakeBackend(config)
    raise ValueError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
