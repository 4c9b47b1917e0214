"""axserving: an offline, OpenAI-compatible LLM serving plane."""

__version__ = "0.1.0"
