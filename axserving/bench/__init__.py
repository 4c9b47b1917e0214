"""Benchmarks shipped with the package: ``axserving bench serve`` (a load generator against any
OpenAI-compatible URL, :mod:`axserving.bench.serving`)."""
