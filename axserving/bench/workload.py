"""The bench's requests: distinct prompts of roughly N words, and the OpenAI bodies that carry them.

Every request gets its own prompt, beginning with the run's salt and its index, so no server can
answer one from another's cache (a prefix cache can share the chat template's header and nothing
more), not even from an earlier run against the same server: llama-server keeps the KV of past
prompts in host memory (``--cache-ram``) and answered a repeated run's prompts from it with one
token to compute. Within a run the same index gives the same prompt on every server, so two
servers get the same workload.

The workloads (:class:`~axserving.bench.options.Workload`) differ in who sends what when:

- ``fixed``: each worker sends its next request when its last one ends (closed loop).
- ``poisson``: requests arrive at exponential gaps of mean 1/rate (open loop, the gaps drawn from
  the seed, so every server sees the same arrival times), with output lengths spread.
- ``chat-shared-prefix``: every conversation starts with the same long system prompt
  (:func:`system_prompt`) and goes on for several turns, each turn sending the whole history back
  with the server's own earlier replies: the shared prefix is what a prefix cache can reuse
  across conversations, the history what it can reuse across turns.
- ``long-prompts``: short streams as ``fixed`` while one more client sends long prompts
  (group ``long``), the case where chunked prefill must keep the short streams' ITL low.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from axserving.bench.options import BenchConfig, Endpoint, Target

_WORDS = (
    "river stone market winter lantern harbor garden copper violin meadow engine bridge candle "
    "forest silver window ladder orchard thunder compass island valley mirror pocket feather "
    "castle village rocket planet letter painter kitchen blanket whistle tunnel basket shadow "
    "morning evening summer autumn spring ocean desert mountain cloud rain snow wind fire smoke "
    "iron glass paper cotton velvet marble timber clay sugar salt pepper honey bread cheese apple "
    "lemon cherry tiger eagle salmon rabbit horse falcon spider beetle whale otter sparrow "
    "doctor farmer sailor teacher baker pilot miner weaver singer judge soldier merchant poet "
    "quiet bright heavy gentle sudden ancient narrow golden hollow distant crooked patient "
    "carries watches builds follows gathers remembers whispers opens crosses measures repairs "
    "slowly often never always nearly almost together beneath beyond across during after before"
).split()


def prompt_text(index: int, words: int, salt: str = "") -> str:
    """Roughly ``words`` words of text, distinct per (``salt``, ``index``) from its first words on."""
    rng = random.Random(f"{salt}/{index}" if salt else index)
    body = " ".join(rng.choice(_WORDS) for _ in range(max(words - 6, 1)))
    head = f"Request {salt}-{index}." if salt else f"Request {index}."
    return f"{head} Continue this story: {body}"


def system_prompt(words: int) -> str:
    """The chat workload's shared system prompt: about ``words`` words, the same for every
    conversation (and every server)."""
    rng = random.Random("system")
    body = " ".join(rng.choice(_WORDS) for _ in range(max(words - 12, 1)))
    return f"You are a storyteller. Keep every answer short. Background for every story: {body}"


# Long prompts and warm-up requests take their prompt indices from ranges no measured request uses.
LONG_INDEX = 500_000_000


def arrival_gaps(cfg: BenchConfig, first_index: int) -> Iterator[float]:
    """Seconds between request arrivals for the open loop (exponential, mean 1/rate), from
    request ``first_index`` on: the same sequence on every server."""
    assert cfg.rate is not None
    rng = random.Random(f"arrivals/{cfg.seed}/{first_index}")
    while True:
        yield rng.expovariate(cfg.rate)


def max_tokens_for(cfg: BenchConfig, index: int) -> int:
    """Request ``index``'s max_tokens: ``cfg.max_tokens``, or with a spread a uniform draw from
    [max_tokens x (1 - spread), max_tokens] seeded by the index (the same on every server)."""
    if cfg.max_tokens_spread <= 0:
        return cfg.max_tokens
    low = max(1, round(cfg.max_tokens * (1 - cfg.max_tokens_spread)))
    seed = f"max_tokens/{index}" if cfg.seed == 0 else f"max_tokens/{cfg.seed}/{index}"
    return random.Random(seed).randint(low, cfg.max_tokens)


def request_body(
    cfg: BenchConfig, target: Target, index: int, *, messages: list[dict[str, str]] | None = None,
    words: int | None = None, max_tokens: int | None = None,
) -> dict[str, Any]:
    """The JSON body for request ``index`` against ``target``: its own prompt of ``words``
    (default ``cfg.prompt_words``) words, or the given chat ``messages``."""
    body: dict[str, Any] = {
        "model": target.model,
        "max_tokens": max_tokens if max_tokens is not None else max_tokens_for(cfg, index),
        "temperature": cfg.temperature,
        "stream": cfg.stream,
    }
    if messages is not None:
        body["messages"] = messages
    else:
        text = prompt_text(index, words if words is not None else cfg.prompt_words, cfg.prompt_salt)
        if cfg.endpoint is Endpoint.chat:
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
    if cfg.stream:
        body["stream_options"] = {"include_usage": True}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
        if cfg.eos_token_ids:
            # For servers that do not know the extension (unknown fields are ignored by ours and by
            # llama_cpp.server): forbid the end-of-sequence tokens instead, so both run to max_tokens.
            body["logit_bias"] = {str(t): -100 for t in cfg.eos_token_ids}
    return body


def path(cfg: BenchConfig) -> str:
    return "/chat/completions" if cfg.endpoint is Endpoint.chat else "/completions"
