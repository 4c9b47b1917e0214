"""The llama.cpp engine driven in-process, no server: the reference for the serving plane's cost.

Runs :class:`engine_proc.backends.llama_cpp.LlamaCppBackend` directly (the code the engine
process runs, with llama.cpp's native sampler chains) on batches of distinct greedy chat
requests with ``ignore_eos``, built from the same prompts as ``perf/bench_serving.py``'s, and
reports per batch size:

- TTFT: from submitting the batch to each sequence's first token (mean, p50, max);
- output tok/s: all generated tokens over the wall time from submit to the last finish
  (vLLM's "output token throughput", the figure ``perf/bench_serving.py`` reports for a server);
- decode tok/s: tokens after the first over the time after the last sequence's first token;
- per-sequence decode tok/s (aggregate / batch size).

Batch sizes take turns round by round, so machine noise hits them alike; figures are medians.

    .venv/bin/python perf/bench_engine.py [--batch 1,8] [--max-tokens 128] [--rounds 3]
        [--threads 2] [--model PATH] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from axserving import model_store  # noqa: E402
from axserving.bench.workload import prompt_text  # noqa: E402
from engine_proc.backends.base import BackendConfig  # noqa: E402
from engine_proc.backends.llama_cpp import LlamaCppBackend  # noqa: E402
from ipc.records import ChatMessage, SamplingParams, Submit  # noqa: E402

def one_round(
    backend: LlamaCppBackend, batch: int, max_tokens: int, words: int, base_rid: int
) -> dict[str, float]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    first: dict[int, float] = {}
    t0 = time.perf_counter()
    for i in range(batch):
        msg = (ChatMessage("user", prompt_text(base_rid + i, words)),)
        backend.submit(Submit(rid=base_rid + i, params=params, messages=msg))
    tokens = 0
    while backend.has_work():
        deltas = backend.step()
        now = time.perf_counter()
        for d in deltas:
            tokens += d.n_tokens
            first.setdefault(d.rid, now)
    t_end = time.perf_counter()
    ttfts = sorted(t - t0 for t in first.values())
    last_first = max(first.values())
    return {
        "ttft_mean_ms": statistics.fmean(ttfts) * 1e3,
        "ttft_p50_ms": statistics.median(ttfts) * 1e3,
        "ttft_max_ms": ttfts[-1] * 1e3,
        "output_tok_s": tokens / (t_end - t0),
        "decode_tok_s": (tokens - batch) / (t_end - last_first),
        "per_seq_decode_tok_s": (tokens - batch) / (t_end - last_first) / batch,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF path (default: the packaged SmolLM2-135M-Instruct)")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-words", type=int, default=64, help="as perf/bench_serving.py's prompts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx-size", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=512, help="tokens per llama_decode")
    ap.add_argument("--option", action="append", default=[], metavar="K=V", help="backend option")
    ap.add_argument(
        "--nice", type=int, default=0,
        help="run at this niceness, as the server runs its engines (engine.nice, 10): the same "
        "priority against whatever else the machine runs",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    sizes = [int(b) for b in args.batch.split(",")]
    model = args.model or str(
        model_store.ensure(model_store.DEFAULT_MODEL, model_store.cache_dir("~/.cache/axserving/models"))
    )
    backend = LlamaCppBackend(
        BackendConfig(
            model_path=model, n_ctx=args.ctx_size, n_threads=args.threads,
            n_batch=args.batch_size, max_batch=max(sizes),
            options=tuple(tuple(o.split("=", 1)) for o in args.option),  # type: ignore[misc]
        )
    )  # fmt: skip
    backend.load()
    try:
        one_round(backend, 1, 8, 8, 10**6)  # warm-up: page the weights in
        results: dict[int, list[dict[str, float]]] = {b: [] for b in sizes}
        rid = 0
        for _ in range(args.rounds):
            for b in sizes:
                results[b].append(one_round(backend, b, args.max_tokens, args.prompt_words, rid))
                rid += b
    finally:
        backend.close()
    summary: dict[str, Any] = {"model": Path(model).name, "threads": args.threads, "max_tokens": args.max_tokens}
    print(f"in-process LlamaCppBackend, {Path(model).name}, {args.threads} threads, "
          f"{args.max_tokens} tokens/request, medians of {args.rounds} rounds")
    print(f"{'batch':>5} {'TTFT mean ms':>12} {'TTFT max ms':>11} {'output tok/s':>12} "
          f"{'decode tok/s':>12} {'per seq':>8}")
    for b in sizes:
        med = {k: statistics.median(r[k] for r in results[b]) for k in results[b][0]}
        summary[f"batch_{b}"] = med
        print(f"{b:>5} {med['ttft_mean_ms']:>12.1f} {med['ttft_max_ms']:>11.1f} {med['output_tok_s']:>12.1f} "
              f"{med['decode_tok_s']:>12.1f} {med['per_seq_decode_tok_s']:>8.1f}")
    if len(sizes) > 1:
        lo, hi = summary[f"batch_{sizes[0]}"], summary[f"batch_{sizes[-1]}"]
        print(f"batch {sizes[-1]} / batch {sizes[0]} output tok/s: x{hi['output_tok_s'] / lo['output_tok_s']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
