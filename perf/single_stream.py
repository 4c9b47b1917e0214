"""TTFT and decode tokens/s of one streaming chat request, three ways, in one run:

- ``server``: through ``axserving run`` (Granian front, shared-memory rings, engine process),
  measured by an HTTP client reading the SSE stream;
- ``engine``: the same backend class driven in this process with no server (the plane's floor);
- ``llama_cpp``: llama-cpp-python's own ``create_chat_completion(stream=True)`` in this process.

Rounds alternate between the three so machine noise hits them alike; figures are medians, and
ratios are against the in-process references measured in the same run.

    .venv/bin/python perf/single_stream.py [--model PATH] [--tokens 128] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from axserving import model_store  # noqa: E402
from engine_proc.backends.base import BackendConfig  # noqa: E402
from engine_proc.backends.llama_cpp import LlamaCppBackend  # noqa: E402
from ipc.records import ChatMessage, SamplingParams, Submit  # noqa: E402
from perf.sse_client import stream_chat  # noqa: E402
from tests.server import run_server  # noqa: E402

SETTLE_S = 0.5
PROMPT = "Write a detailed essay about the history of lighthouses and the people who kept them."


def prompt(i: int) -> str:
    """Round ``i``'s prompt: distinct from its first token, so no path answers from a prefix
    cache and every TTFT includes the whole prompt's prefill."""
    return f"Essay {i}. {PROMPT}"


def measure_server(url: str, key: str, tokens: int, i: int) -> tuple[float, float]:
    """TTFT and decode rate as a client sees them. The client is a bare socket that only
    timestamps what it receives and parses afterwards: on 2 cores the client shares the
    engine's CPUs, and an HTTP library's per-event parsing (h11 is pure Python, ~0.3 ms per
    event here) would be charged to the server."""
    body = {
        "model": "default", "stream": True, "temperature": 0, "max_tokens": tokens, "ignore_eos": True,
        "messages": [{"role": "user", "content": prompt(i)}], "stream_options": {"include_usage": True},
    }
    t0, events = stream_chat(url, key, body)
    first = last = None
    n = 0
    for at, payload in events:
        if payload == b"[DONE]":
            continue
        chunk = orjson.loads(payload)
        if "error" in chunk:
            raise RuntimeError(f"the server ended the stream with an error: {chunk['error']}")
        if chunk.get("usage"):
            n = chunk["usage"]["completion_tokens"]
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = first or at
            last = at
    assert first is not None and last is not None and n == tokens, (n, tokens)
    return first - t0, (n - 1) / (last - first)


def measure_engine(backend: LlamaCppBackend, tokens: int, rid: int) -> tuple[float, float]:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    backend.submit(Submit(rid=rid, params=params, messages=(ChatMessage("user", prompt(rid)),)))
    first = last = None
    n = 0
    while backend.has_work():
        for d in backend.step():
            n = d.completion_tokens
            if d.text:  # as the HTTP client sees it: the first visible text
                now = time.perf_counter()
                first = first or now
                last = now
    assert first is not None and last is not None and n == tokens
    return first - t0, (n - 1) / (last - first)


def measure_llama_cpp(llm, tokens: int, i: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    llm.reset()  # no prompt-cache reuse across rounds: every path prefills the whole prompt
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for chunk in llm.create_chat_completion(
        messages=[{"role": "user", "content": prompt(i)}], temperature=0, max_tokens=tokens, stream=True,
        logit_bias=None,
    ):
        if chunk["choices"][0]["delta"].get("content"):
            now = time.perf_counter()
            first = first or now
            last = now
            n += 1
    assert first is not None and last is not None
    return first - t0, (n - 1) / (last - first)


def main() -> None:
    # `timeout` sends SIGTERM: exit through the context managers, so the servers they started stop.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--engine-nice", type=int,
        help="the server's engine.nice (default: the configured 10); the in-process paths run at this "
        "process's niceness",
    )
    ap.add_argument(
        "--server-env", action="append", default=[], metavar="K=V",
        help="an environment variable for the server (and so its engine) only; repeatable",
    )
    args = ap.parse_args()
    server_env = dict(kv.split("=", 1) for kv in args.server_env)
    if args.engine_nice is not None:
        server_env["AXS_ENGINE_NICE"] = str(args.engine_nice)
    model = args.model or model_store.ensure(model_store.DEFAULT_MODEL, model_store.cache_dir("~/.cache/axserving/models"))

    import llama_cpp

    config = BackendConfig(model_path=str(model), n_ctx=2048, n_threads=args.threads)
    engine = LlamaCppBackend(config)
    engine.load()
    llm = llama_cpp.Llama(str(model), n_ctx=2048, n_threads=args.threads, verbose=False)
    results: dict[str, list[tuple[float, float]]] = {"server": [], "engine": [], "llama_cpp": []}
    with tempfile.TemporaryDirectory() as tmp, run_server(
        Path(tmp), "--model", str(model), "--threads", str(args.threads), "--ctx-size", "2048",
        api_key="perf-key", ready_timeout=180,
        env=server_env,
    ) as server:
        measure_server(server.url, "perf-key", 8, 10**6)  # warm-up: page in weights
        measure_engine(engine, 8, 10**6 + 1)
        for i in range(args.rounds):
            # A pause before each path: llama.cpp's OpenMP workers spin for a while after their
            # last step, and would otherwise steal the other path's cores.
            time.sleep(SETTLE_S)
            results["server"].append(measure_server(server.url, "perf-key", args.tokens, 3 * i))
            time.sleep(SETTLE_S)
            results["engine"].append(measure_engine(engine, args.tokens, 3 * i + 1))
            time.sleep(SETTLE_S)
            # llama-cpp-python's high-level path stops at EOS (it has no ignore_eos); its tok/s
            # is still per generated token.
            results["llama_cpp"].append(measure_llama_cpp(llm, args.tokens, 3 * i + 2))
    engine.close()

    med = {k: (statistics.median(t for t, _ in v), statistics.median(r for _, r in v)) for k, v in results.items()}
    nice = "configured" if args.engine_nice is None else args.engine_nice
    print(f"model {model.name}, threads {args.threads}, {args.tokens} tokens, {args.rounds} rounds (medians), "
          f"server engine nice {nice}" + (f", server env {server_env}" if args.server_env else ""))
    print(f"{'path':<12}{'TTFT ms':>10}{'decode tok/s':>15}")
    for k, (ttft, rate) in med.items():
        print(f"{k:<12}{ttft * 1000:>10.1f}{rate:>15.1f}")
    s, e, l = med["server"], med["engine"], med["llama_cpp"]
    print(f"server vs engine:    TTFT +{(s[0] - e[0]) * 1000:.1f} ms, decode x{s[1] / e[1]:.3f}")
    print(f"server vs llama_cpp: TTFT x{s[0] / l[0]:.3f}, decode x{s[1] / l[1]:.3f}")
    # Paired per round (the two paths ran seconds apart, so slow drifts of the machine cancel):
    # the median and quartiles of the round-by-round differences.
    pairs = list(zip(results["server"], results["engine"], strict=True))
    ttft_diff = [(sv[0] - en[0]) * 1000 for sv, en in pairs]
    ratio = [sv[1] / en[1] for sv, en in pairs]
    if len(pairs) >= 4:
        tq, rq = statistics.quantiles(ttft_diff, n=4), statistics.quantiles(ratio, n=4)
        print(f"paired by round:     TTFT {tq[1]:+.1f} ms (quartiles {tq[0]:+.1f}, {tq[2]:+.1f}), "
              f"decode x{rq[1]:.3f} (quartiles {rq[0]:.3f}, {rq[2]:.3f})")


if __name__ == "__main__":
    main()
