"""Prompt-lookup drafting (``draft_tokens``) against plain decoding, in-process, same prompts.

Two :class:`engine_proc.backends.llama_cpp.LlamaCppBackend` instances in one process, one with
``draft_tokens`` and one without, take turns on the same batches of greedy chat requests (the
bench's prompts, ``ignore_eos``), round by round so machine noise hits both alike. Per batch size
it prints output tok/s of each, their ratio (the median over rounds), the steps each took, and
whether every reply came out the same; then the drafted and kept token counts.

Replies may differ where a prompt's chunking differs (llama.cpp rounds a chunk of 64 tokens or
more differently, and a prompt that joins running streams is chunked by measured step times):
with all of a batch's requests sent at once they are chunked alike, and the replies must match.

    .venv/bin/python perf/draft_vs_plain.py [--draft-tokens 6] [--batch 1,8] [--rounds 3]
        [--max-tokens 128] [--threads 2] [--model PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from axserving import model_store  # noqa: E402
from axserving.bench.workload import prompt_text  # noqa: E402
from engine_proc.backends.base import BackendConfig  # noqa: E402
from engine_proc.backends.llama_cpp import LlamaCppBackend  # noqa: E402
from ipc.records import ChatMessage, SamplingParams, Submit  # noqa: E402


def one_round(backend: LlamaCppBackend, batch: int, max_tokens: int, base: int) -> tuple[float, dict[int, str], int]:
    """Output tok/s, each request's text, and the steps taken, for ``batch`` requests sent at once."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        msg = (ChatMessage("user", prompt_text(base + i, 64, "draft")),)
        backend.submit(Submit(rid=base + i, params=params, messages=msg))
    texts: dict[int, str] = {}
    tokens = steps = 0
    t0 = time.perf_counter()
    while backend.has_work():
        for d in backend.step():
            tokens += d.n_tokens
            texts[d.rid] = texts.get(d.rid, "") + d.text
        steps += 1
    return tokens / (time.perf_counter() - t0), texts, steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF path (default: the packaged SmolLM2-135M-Instruct)")
    ap.add_argument("--draft-tokens", type=int, default=6)
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    sizes = [int(b) for b in args.batch.split(",")]
    model = args.model or str(
        model_store.ensure(model_store.DEFAULT_MODEL, model_store.cache_dir("~/.cache/axserving/models"))
    )

    def backend(draft: int) -> LlamaCppBackend:
        b = LlamaCppBackend(BackendConfig(model_path=model, n_threads=args.threads, max_batch=max(sizes), draft_tokens=draft))
        b.load()
        return b

    plain, drafting = backend(0), backend(args.draft_tokens)
    try:
        for b in (plain, drafting):
            one_round(b, 1, 8, 10**6)  # warm-up: page the weights in
        ratios: dict[int, list[float]] = {s: [] for s in sizes}
        same = total = base = 0
        print(f"draft_tokens {args.draft_tokens} against 0, {Path(model).name}, {args.threads} threads, "
              f"{args.max_tokens} tokens a request")
        for r in range(args.rounds):
            for size in sizes:
                a, ta, sa = one_round(plain, size, args.max_tokens, base)
                d, td, sd = one_round(drafting, size, args.max_tokens, base)
                base += size
                ratios[size].append(d / a)
                same += sum(ta[k] == td.get(k) for k in ta)
                total += len(ta)
                print(f"round {r + 1} batch {size:>3}: plain {a:6.1f} tok/s ({sa} steps), "
                      f"drafting {d:6.1f} tok/s ({sd} steps): x{d / a:.2f}", flush=True)
        print("drafting / plain output tok/s, medians: "
              + ", ".join(f"batch {s} x{statistics.median(v):.2f}" for s, v in ratios.items()))
        print(f"replies identical: {same}/{total}; drafted {drafting.drafted_tokens} tokens, "
              f"kept {drafting.kept_tokens}")
        return 0 if same == total else 1
    finally:
        plain.close()
        drafting.close()


if __name__ == "__main__":
    sys.exit(main())
