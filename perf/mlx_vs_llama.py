"""MLX next to llama.cpp on the same model, same run: decode tokens/s of the engine backends
in-process (no HTTP), one stream and a batch of ``--batch`` streams, greedy, ``--tokens``
each with the end of generation ignored, rounds alternating; and how many first tokens their
greedy replies share on a few chats.

    .venv/bin/python perf/mlx_vs_llama.py [--gguf FILE] [--mlx DIR] [--tokens 64] [--batch 8]
        [--rounds 2]

``--mlx`` defaults to a fresh ``axserving models convert`` of ``--gguf`` (the packaged SmolLM2).
On Linux MLX runs its reference CPU path (one thread, naive kernels): expect a small fraction of
llama.cpp's speed; on Apple Silicon it runs on Metal.
"""

from __future__ import annotations

import argparse
import os
import array
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from axserving import model_store  # noqa: E402
from engine_proc.backends import make_backend  # noqa: E402
from engine_proc.backends.base import Backend  # noqa: E402
from engine_proc.spec import BackendConfig  # noqa: E402
from ipc.records import ChatMessage, Generation, Kind, SamplingParams, Submit  # noqa: E402

CHATS = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea.", "What is 2 + 2?"]
STORY = "Tell me a long story about a lighthouse keeper number {}."


def submit(b: Backend, rid: int, content: str, max_tokens: int, ignore_eos: bool) -> None:
    b.submit(Submit(
        rid=rid, kind=Kind.generate,
        params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos),
        gen=Generation(logprobs=0), messages=(ChatMessage("user", content),),
    ))  # fmt: skip


def decode_rate(b: Backend, streams: int, tokens: int) -> float:
    """Generated tokens per second once every stream has its first token (prefill excluded)."""
    for i in range(streams):
        submit(b, 1000 + i, STORY.format(i), tokens, ignore_eos=True)
    started: set[int] = set()
    began, counted = 0.0, 0
    while b.has_work():
        for d in b.step():
            if d.rid in started:
                counted += d.n_tokens
            else:
                started.add(d.rid)
                if len(started) == streams:
                    began = time.monotonic()
    return counted / max(time.monotonic() - began, 1e-9)


def greedy(b: Backend, max_tokens: int = 24) -> list[list[int]]:
    out: dict[int, array.array[int]] = {i: array.array("i") for i in range(len(CHATS))}
    for i, c in enumerate(CHATS):
        submit(b, i, c, max_tokens, ignore_eos=False)
    while b.has_work():
        for d in b.step():
            out[d.rid].frombytes(d.token_ids)
    return [out[i].tolist() for i in range(len(CHATS))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--mlx", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    gguf = args.gguf or model_store.ensure(model_store.DEFAULT_MODEL, model_store.cache_dir(os.environ.get("AXS_MODEL_CACHE", "~/.cache/axserving/models")))
    tmp = tempfile.TemporaryDirectory()
    mlx_dir = args.mlx
    if mlx_dir is None:
        from axserving.models.convert import convert

        mlx_dir = convert(gguf, Path(tmp.name) / "model")
    backends: dict[str, Backend] = {
        "llama_cpp": make_backend("llama_cpp", BackendConfig(str(gguf), n_ctx=2048, n_threads=args.threads,
                                                             max_batch=args.batch)),
        "mlx": make_backend("mlx", BackendConfig(str(mlx_dir), n_ctx=2048, n_threads=args.threads,
                                                 max_batch=args.batch)),
    }
    for b in backends.values():
        b.load()
    replies = {name: greedy(b) for name, b in backends.items()}
    agree = []
    for a, c in zip(replies["mlx"], replies["llama_cpp"], strict=True):
        n = 0
        while n < min(len(a), len(c)) and a[n] == c[n]:
            n += 1
        agree.append(n)
    print(f"greedy agreement on {len(CHATS)} chats (first tokens shared, of 24): {agree}")
    rates: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        order = list(backends) if r % 2 == 0 else list(reversed(backends))
        for name in order:
            for streams in (1, args.batch):
                rate = decode_rate(backends[name], streams, args.tokens)
                rates.setdefault((name, streams), []).append(rate)
                print(f"round {r + 1}: {name:9s} {streams} stream(s): {rate:7.1f} tok/s", flush=True)
    print(f"\ndecode tok/s, median of {args.rounds} rounds ({args.tokens} tokens per stream, {args.threads} threads):")
    for streams in (1, args.batch):
        lc = sorted(rates[("llama_cpp", streams)])[args.rounds // 2]
        ml = sorted(rates[("mlx", streams)])[args.rounds // 2]
        print(f"  {streams} stream(s): llama.cpp {lc:7.1f}  mlx {ml:7.1f}  mlx/llama.cpp x{ml / lc:.3f}")
    for b in backends.values():
        b.close()
    tmp.cleanup()


if __name__ == "__main__":
    main()
