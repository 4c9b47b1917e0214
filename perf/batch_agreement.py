"""Cross-talk check for a batching server: distinct prompts served together vs the same served alone.

At temperature 0 each request's text must not depend on its batch neighbours beyond the last
bits of batched kernels: a greedy continuation may fork late (near-tied logits), but it must
never turn into another request's text or another topic. This sends ``--n`` distinct chat
prompts one at a time, then all at once, and reports per request how many tokens of the
batched reply agree with the lone reply before they first differ (tokens counted with the
model's own tokenizer, loaded vocab-only), and whether a reply resembles another request's.

    .venv/bin/python perf/batch_agreement.py --url http://127.0.0.1:18080 --api-key sk-local [--n 8]
        [--max-tokens 64] [--model-path GGUF]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from axserving import model_store  # noqa: E402
from axserving.bench.workload import prompt_text  # noqa: E402


async def ask(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> str:
    body: dict[str, Any] = {
        "model": "default", "temperature": 0, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": prompt}],
    }  # fmt: skip
    r = await client.post(f"{url}/v1/chat/completions", json=body)
    r.raise_for_status()
    content: str = r.json()["choices"][0]["message"]["content"] or ""
    return content


def agreeing_tokens(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


async def run(args: argparse.Namespace) -> int:
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=args.model_path, vocab_only=True, verbose=False)

    def tokens(text: str) -> list[int]:
        return vocab.tokenize(text.encode(), add_bos=False, special=False)

    prompts = [prompt_text(i, args.prompt_words) for i in range(args.n)]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.n + 2)
    async with httpx.AsyncClient(headers=headers, timeout=600, limits=limits) as client:
        alone = [await ask(client, args.url, p, args.max_tokens) for p in prompts]
        together = await asyncio.gather(*(ask(client, args.url, p, args.max_tokens) for p in prompts))
    total = agree_total = 0
    crossed = 0
    print(f"{'req':>3} {'tokens':>6} {'agree':>5}  first difference")
    for i, (a, t) in enumerate(zip(alone, together, strict=True)):
        ta, tt = tokens(a), tokens(t)
        n = agreeing_tokens(ta, tt)
        total += len(ta)
        agree_total += n
        # A reply that shares more with another request's lone reply than with its own is
        # cross-talk (another request's text), whatever the kernels' rounding.
        others = [agreeing_tokens(tokens(alone[j]), tt) for j in range(args.n) if j != i]
        if others and max(others) > n:
            crossed += 1
        where = "identical" if ta == tt else repr(t[len(vocab.detokenize(tt[:n]).decode(errors="replace")):][:40])
        print(f"{i:>3} {len(ta):>6} {n:>5}  {where}")
    print(f"agreeing tokens before the first difference: {agree_total}/{total} "
          f"({100 * agree_total / max(total, 1):.1f}%); identical replies: "
          f"{sum(a == t for a, t in zip(alone, together, strict=True))}/{args.n}; cross-talk: {crossed}")
    return 1 if crossed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--api-key")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--model-path", help="GGUF whose tokenizer counts tokens (default: the packaged model)")
    args = ap.parse_args(argv)
    if args.model_path is None:
        args.model_path = str(
            model_store.ensure(model_store.DEFAULT_MODEL, model_store.cache_dir("~/.cache/axserving/models"))
        )
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
