"""llama.cpp's two attention kernels on this machine: flash attention on against off, for decode
steps and for prompts, in one process, alternating, so the engine's ``flash_attn`` setting can be
chosen from figures rather than guessed.

Decode: ``--seqs`` sequences (each holding ``--context`` tokens of its own, split KV as the
engine runs it) decode one token each per step; the median step. Prompts: one prompt of
``--prompt`` tokens in ``batch_size`` chunks; the fastest of the rounds. Prints each time with
flash attention on and off and off / on (< 1: off is faster).

    .venv/bin/python perf/attention_kernels.py [--model-path GGUF] [--threads 2] [--seqs 1,8]
        [--context 200,1000] [--prompt 64,512,1536] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import llama_cpp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from axserving import model_store  # noqa: E402

BATCH = 512
SEQS_MAX = 16
_QUIET = llama_cpp.llama_log_callback(lambda *_: None)  # kept referenced: llama.cpp calls it


class Context:
    """A generation context as the engine makes one (split KV, ``SEQS_MAX`` sequences)."""

    def __init__(self, model: llama_cpp.llama_model_p, flash: bool, threads: int, n_ctx: int) -> None:
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = n_ctx * SEQS_MAX
        p.n_batch = p.n_ubatch = BATCH
        p.n_seq_max = SEQS_MAX
        p.n_threads = p.n_threads_batch = threads
        p.kv_unified = False
        p.no_perf = True
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = llama_cpp.llama_init_from_model(model, p)
        if self.ctx is None:
            raise SystemExit("could not create a llama.cpp context")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(BATCH, 0, 1)

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:  # (token, pos, seq, logits)
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos  # type: ignore[call-overload]
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(entries)
        if llama_cpp.llama_decode(self.ctx, b) != 0:
            raise SystemExit("llama_decode failed")

    def prompt(self, n: int, seq: int = 0) -> float:
        llama_cpp.llama_memory_clear(self.mem, True)
        tokens = [(100 + i % 700, i, seq, i == n - 1) for i in range(n)]
        began = time.perf_counter()
        for start in range(0, n, BATCH):
            self.decode(tokens[start:start + BATCH])
        return time.perf_counter() - began

    def decode_step(self, seqs: int, context: int, steps: int = 24) -> float:
        self.prompt(context)
        for seq in range(1, seqs):
            llama_cpp.llama_memory_seq_cp(self.mem, 0, seq, -1, -1)
        times = []
        for k in range(steps):
            began = time.perf_counter()
            self.decode([(200 + k, context + k, seq, True) for seq in range(seqs)])
            times.append(time.perf_counter() - began)
        return statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seqs", default="1,8")
    ap.add_argument("--context", default="200,1000")
    ap.add_argument("--prompt", default="64,512,1536")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    path = args.model_path or str(
        model_store.ensure(model_store.DEFAULT_MODEL, model_store.cache_dir("~/.cache/axserving/models")))
    seqs = [int(s) for s in args.seqs.split(",")]
    contexts = [int(c) for c in args.context.split(",")]
    prompts = [int(p) for p in args.prompt.split(",")]
    llama_cpp.llama_log_set(_QUIET, None)
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
    n_ctx = max(max(contexts) + 64, max(prompts))
    results: dict[tuple[str, int, int, bool], list[float]] = {}
    for round_ in range(args.rounds):
        for flash in ((True, False) if round_ % 2 == 0 else (False, True)):
            ctx = Context(model, flash, args.threads, n_ctx)
            try:
                for s in seqs:
                    for c in contexts:
                        results.setdefault(("decode", s, c, flash), []).append(ctx.decode_step(s, c))
                for p in prompts:
                    results.setdefault(("prompt", p, 0, flash), []).append(ctx.prompt(p))
            finally:
                ctx.close()
    print(f"{Path(path).name}, {args.threads} threads, split KV, {args.rounds} rounds alternating")
    print(f"{'what':<34}{'flash on ms':>12}{'off ms':>10}{'off / on':>10}")
    for kind, a, b in sorted({(k, a, b) for k, a, b, _ in results}):
        pick = statistics.median if kind == "decode" else min
        on, off = pick(results[(kind, a, b, True)]), pick(results[(kind, a, b, False)])
        what = f"decode step, {a} seqs x {b} ctx" if kind == "decode" else f"prompt of {a} tokens"
        print(f"{what:<34}{on * 1e3:>12.1f}{off * 1e3:>10.1f}{off / on:>10.3f}")
    llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    main()
