"""Backends: the real runtimes (llama_cpp) and the test double (fake), listed in
:data:`engine_proc.spec.BACKENDS`."""

from __future__ import annotations

from engine_proc.backends.base import Backend
from engine_proc.spec import BackendConfig, backend_class


def make_backend(name: str, config: BackendConfig) -> Backend:
    """Imported lazily: the fake needs nothing heavy, and only the engine imports a runtime."""
    if name == "llama_cpp" and config.embeddings:
        from engine_proc.backends.llama_embed import LlamaEmbeddingBackend

        return LlamaEmbeddingBackend(config)
    return backend_class(name)(config)
