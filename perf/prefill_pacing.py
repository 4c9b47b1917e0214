"""Prompts joining running streams, in-process: the prefill pacer's settings against each other.

Eight closed-loop clients stream short replies (``--max-tokens`` each, a new request as soon as one
ends) on the llama.cpp backend driven in this process (no server), while one more client sends a
long prompt (``--long-words``) ``--long-interval`` seconds after its last one ended, as
``axserving bench serve --workload long-prompts`` does. Each setting gets its own backend (loaded
once), the settings take turns round by round, and per setting the medians of the rounds are
printed: output tokens a second, the short streams' gaps between tokens (p50, p90, p99, max: what
the pacer spreads a long prompt over) and the long prompts' time to first token, then ratios of
each setting to the first.

    .venv/bin/python perf/prefill_pacing.py [--setting stall_ms=500] [--setting stall_ms=50]
        [--duration 40] [--rounds 2] [--threads 2]

A setting is comma-separated ``stall_ms=MS`` and ``slowdown=X`` (``prefill_stall_ms``,
``prefill_slowdown``); the defaults compare the shipped 500 ms with 50 ms.
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
from engine_proc.spec import DEFAULT_PREFILL_SLOWDOWN, DEFAULT_PREFILL_STALL_MS  # noqa: E402
from ipc.records import ChatMessage, SamplingParams, Submit  # noqa: E402

SHORT_CLIENTS = 8


def parse_setting(text: str) -> dict[str, float]:
    out = {"stall_ms": float(DEFAULT_PREFILL_STALL_MS), "slowdown": DEFAULT_PREFILL_SLOWDOWN}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in out:
            raise SystemExit(f"unknown setting {key!r} (stall_ms, slowdown)")
        out[key] = float(value)
    return out


class Run:
    """One setting's backend and its clients' state across rounds."""

    def __init__(self, model: str, setting: dict[str, float], threads: int) -> None:
        self.backend = LlamaCppBackend(BackendConfig(
            model_path=model, n_ctx=4096, n_threads=threads, n_batch=512, max_batch=16, measure_batch=True,
            prefill_slowdown=setting["slowdown"], prefill_stall_ms=int(setting["stall_ms"]),
        ))
        self.backend.load()
        self.rid = 0

    def submit(self, words: int, max_tokens: int) -> int:
        self.rid += 1
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        # Distinct prompts from their first words: no run answers from another's cached prefix.
        text = prompt_text(self.rid * 7919 + words, words)
        self.backend.submit(Submit(rid=self.rid, params=params, messages=(ChatMessage("user", text),)))
        return self.rid

    def round(self, duration: float, max_tokens: int, long_words: int, long_interval: float) -> dict[str, float]:
        be = self.backend
        shorts = {self.submit(64, max_tokens) for _ in range(SHORT_CLIENTS)}
        long_rid: int | None = None
        long_sent = 0.0
        next_long = time.perf_counter() + long_interval
        last: dict[int, float] = {}
        gaps: list[float] = []
        ttfts: list[float] = []
        tokens = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < duration:
            if long_rid is None and time.perf_counter() >= next_long:
                long_rid, long_sent = self.submit(long_words, 16), time.perf_counter()
            deltas = be.step()
            now = time.perf_counter()
            for d in deltas:
                if d.n_tokens:
                    tokens += d.n_tokens
                    if d.rid == long_rid and d.rid not in last:
                        ttfts.append(now - long_sent)
                    elif d.rid in last and d.rid in shorts:
                        gaps.append(now - last[d.rid])
                    last[d.rid] = now
                if d.finish_reason is not None:
                    last.pop(d.rid, None)
                    if d.rid == long_rid:
                        long_rid, next_long = None, now + long_interval
                    else:
                        shorts.discard(d.rid)
                        shorts.add(self.submit(64, max_tokens))
        wall = time.perf_counter() - t0
        for rid in [*shorts, *([long_rid] if long_rid is not None else [])]:  # end the round's requests
            be.abort(rid)
        while be.has_work():
            be.step()
        gaps.sort()

        def q(p: float) -> float:
            return gaps[min(len(gaps) - 1, int(p * len(gaps)))] * 1e3 if gaps else float("nan")

        return {
            "tok_s": tokens / wall, "gap_p50": q(0.50), "gap_p90": q(0.90), "gap_p99": q(0.99),
            "gap_max": gaps[-1] * 1e3 if gaps else float("nan"),
            "long_ttft": statistics.median(ttfts) * 1e3 if ttfts else float("nan"),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", action="append", default=[], help="stall_ms=MS,slowdown=X (repeatable)")
    ap.add_argument("--duration", type=float, default=40.0, help="seconds per setting and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--long-words", type=int, default=1200)
    ap.add_argument("--long-interval", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", help="GGUF path (default: the packaged SmolLM2-135M-Instruct)")
    args = ap.parse_args(argv)
    texts = args.setting or [f"stall_ms={DEFAULT_PREFILL_STALL_MS}", "stall_ms=50"]
    settings = [parse_setting(t) for t in texts]
    model = args.model or str(
        model_store.ensure(model_store.DEFAULT_MODEL, model_store.cache_dir("~/.cache/axserving/models"))
    )
    runs = [Run(model, s, args.threads) for s in settings]
    results: list[list[dict[str, float]]] = [[] for _ in runs]
    try:
        order = list(range(len(runs)))
        for _ in range(args.rounds):
            for i in order:
                results[i].append(runs[i].round(args.duration, args.max_tokens, args.long_words, args.long_interval))
            order.reverse()
    finally:
        for run in runs:
            run.backend.close()
    keys = ["tok_s", "gap_p50", "gap_p90", "gap_p99", "gap_max", "long_ttft"]
    med = [{k: statistics.median(r[k] for r in rows) for k in keys} for rows in results]
    print(f"{SHORT_CLIENTS} closed-loop streams of {args.max_tokens} tokens and a {args.long_words}-word prompt "
          f"{args.long_interval:g} s after the last, {args.duration:g} s x {args.rounds} rounds (medians), "
          f"{Path(model).name}, {args.threads} threads")
    print(f"{'setting':<28}{'tok/s':>8}{'gap p50':>9}{'p90':>7}{'p99':>7}{'max':>7}{'long TTFT':>11}  (ms)")
    for text, m in zip(texts, med, strict=True):
        print(f"{text:<28}{m['tok_s']:>8.1f}{m['gap_p50']:>9.0f}{m['gap_p90']:>7.0f}{m['gap_p99']:>7.0f}"
              f"{m['gap_max']:>7.0f}{m['long_ttft']:>11.0f}")
    for text, m in zip(texts[1:], med[1:], strict=True):
        ratios = "  ".join(f"{k} x{med[0][k] / m[k]:.2f}" for k in keys if m[k] == m[k] and m[k])
        print(f"{texts[0]} / {text}: {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
