"""What constrained decoding and logprobs cost per token, as ratios to plain decoding in the same run.

The llama.cpp backend in-process (no server, so only the output layer's cost is measured), on the
packaged model: one stream, then 8 together, each ``--tokens`` long, rounds alternating:

- plain: no grammar, no logprobs (ignore_eos, so every run is the same length);
- logprobs: ``top_logprobs=5`` (log-softmax over the vocabulary and the top 5, per token);
- grammar: a GBNF grammar that allows any lowercase text (a mask computed and applied per token);
- json_schema: a schema with a long string field (the mask follows the JSON state).

Every request runs to ``--tokens`` (the grammars cannot complete sooner), so the runs compare.

    .venv/bin/python perf/structured_cost.py [--rounds 3] [--tokens 96] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

from engine_proc.backends.llama_cpp import LlamaCppBackend
from engine_proc.grammar import gbnf_grammar, json_schema_grammar
from engine_proc.spec import BackendConfig
from ipc.records import ChatMessage, Generation, SamplingParams, Submit

PROMPT = (ChatMessage("user", "Write a long description of the sea, in lowercase words only."),)


def variants() -> dict[str, Generation]:
    # minLength keeps the JSON open for the whole run: every variant generates the same tokens.
    schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": 2000}}, "required": ["text"]}
    return {
        "plain": Generation(),
        "logprobs": Generation(logprobs=5),
        "grammar": Generation(grammar=gbnf_grammar('root ::= [a-z ,.]+')),
        "json_schema": Generation(grammar=json_schema_grammar(schema)),
    }


def run(backend: LlamaCppBackend, gen: Generation, streams: int, tokens: int, rid: int) -> float:
    """Tokens per second over ``streams`` requests run together."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    for i in range(streams):
        backend.submit(Submit(rid=rid + i, params=params, messages=PROMPT, gen=gen))
    n = 0
    began = time.perf_counter()
    while backend.has_work():
        n += sum(d.n_tokens for d in backend.step())
    assert n == streams * tokens, f"{n} tokens, expected {streams * tokens}"
    return n / (time.perf_counter() - began)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model")
    args = ap.parse_args()
    import subprocess
    import sys

    path = args.model or subprocess.run([sys.executable, "-m", "axserving.cli", "models", "path"],
                                        capture_output=True, text=True, check=True).stdout.strip()
    backend = LlamaCppBackend(BackendConfig(model_path=path, n_ctx=1024, n_threads=args.threads, max_batch=8))
    backend.load()
    gens = variants()
    results: dict[tuple[str, int], list[float]] = {}
    rid = 1
    run(backend, gens["grammar"], 1, 4, 0)  # build llguidance's vocabulary once, outside the timing
    for r in range(args.rounds):
        for streams in (1, 8):
            for name, gen in gens.items():
                results.setdefault((name, streams), []).append(run(backend, gen, streams, args.tokens, rid))
                rid += streams
        print(f"round {r + 1} done", flush=True)
    backend.close()
    print(f"\n{'variant':<12} {'streams':>7} {'tok/s (median)':>15} {'ratio to plain':>15}")
    for streams in (1, 8):
        plain = statistics.median(results[("plain", streams)])
        for name in gens:
            med = statistics.median(results[(name, streams)])
            print(f"{name:<12} {streams:>7} {med:>15.1f} {med / plain:>15.2f}")


if __name__ == "__main__":
    main()
