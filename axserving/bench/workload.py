"""The bench's requests: distinct prompts of roughly N words, and the OpenAI bodies that carry them.

Every request gets its own prompt, beginning with its index, so no server can answer one from
another's cache (a prefix cache can share the chat template's header and nothing more). The same
index gives the same prompt on every server, so two servers get the same workload.
"""

from __future__ import annotations

import random
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


def prompt_text(index: int, words: int) -> str:
    """Roughly ``words`` words of text, distinct per ``index`` from its first words on."""
    rng = random.Random(index)
    body = " ".join(rng.choice(_WORDS) for _ in range(max(words - 6, 1)))
    return f"Request {index}. Continue this story: {body}"


def max_tokens_for(cfg: BenchConfig, index: int) -> int:
    """Request ``index``'s max_tokens: ``cfg.max_tokens``, or with a spread a uniform draw from
    [max_tokens x (1 - spread), max_tokens] seeded by the index (the same on every server)."""
    if cfg.max_tokens_spread <= 0:
        return cfg.max_tokens
    low = max(1, round(cfg.max_tokens * (1 - cfg.max_tokens_spread)))
    return random.Random(f"max_tokens/{index}").randint(low, cfg.max_tokens)


def request_body(cfg: BenchConfig, target: Target, index: int) -> dict[str, Any]:
    """The JSON body for request ``index`` against ``target``."""
    text = prompt_text(index, cfg.prompt_words)
    body: dict[str, Any] = {
        "model": target.model,
        "max_tokens": max_tokens_for(cfg, index),
        "temperature": cfg.temperature,
        "stream": cfg.stream,
    }
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
