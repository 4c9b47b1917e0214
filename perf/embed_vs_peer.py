"""Embedding throughput, axserving next to llama-cpp-python's server, same model, same run.

Both servers embed with the packaged SmolLM2 (mean pooling) on the same threads; rounds take
turns. Reports inputs/s with one input per request (sequential requests) and with 64 inputs per
request, and the ratio ours/theirs.

    .venv/bin/python perf/embed_vs_peer.py [--rounds 3] [--threads 2]
Needs the perf extra (``pip install -e '.[perf]'``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time

import httpx

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from parity_fields import _server

TEXTS = [f"Sentence {i}: the quick brown fox jumps over the lazy dog number {i % 13}." for i in range(64)]


def rate(url: str, model: str, batch: int, requests: int) -> float:
    """Inputs per second over ``requests`` requests of ``batch`` inputs each."""
    headers = {"Authorization": "Bearer sk-parity"}
    with httpx.Client(timeout=300) as c:
        began = time.perf_counter()
        for i in range(requests):
            body = {"model": model, "input": TEXTS[:batch] if batch > 1 else TEXTS[i % len(TEXTS)]}
            r = c.post(f"{url}/v1/embeddings", json=body, headers=headers)
            r.raise_for_status()
            assert len(r.json()["data"]) == batch
        return batch * requests / (time.perf_counter() - began)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="2")
    args = ap.parse_args()
    model = subprocess.run([sys.executable, "-m", "axserving.cli", "models", "path"], capture_output=True, text=True,
                           check=True).stdout.strip()
    ours, peer = "http://127.0.0.1:18290", "http://127.0.0.1:18291"
    results: dict[tuple[str, int], list[float]] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(_server([sys.executable, "-m", "axserving.cli", "run", "--threads", args.threads,
                                     "--host", "127.0.0.1", "--port", "18290"], ours, "/tmp/embed_ours.log",
                                    {"AXS_API_KEY": "sk-parity"}))
        r = httpx.post(f"{ours}/v1/models", headers={"Authorization": "Bearer sk-parity"}, timeout=300, json={
            "model_id": "embed", "path": model, "enable_embeddings": True, "context_length": 2048, "max_batch": 64,
            "threads": int(args.threads)})
        r.raise_for_status()
        stack.enter_context(_server([sys.executable, "-m", "llama_cpp.server", "--model", model, "--model_alias", "embed",
                                     "--embedding", "true", "--n_threads", args.threads, "--n_ctx", "2048",
                                     "--n_batch", "2048", "--host", "127.0.0.1", "--port", "18291"], peer,
                                    "/tmp/embed_peer.log"))
        for label, url, name in (("ours", ours, "embed"), ("peer", peer, "embed")):
            rate(url, name, 1, 3)  # warm up
        for _ in range(args.rounds):
            for label, url in (("ours", ours), ("peer", peer)):
                results.setdefault((label, 1), []).append(rate(url, "embed", 1, 32))
                results.setdefault((label, 64), []).append(rate(url, "embed", 64, 3))
    print(f"{'inputs/request':>14} {'axserving in/s':>15} {'llama_cpp.server in/s':>22} {'ratio':>6}")
    for batch in (1, 64):
        a = statistics.median(results[("ours", batch)])
        b = statistics.median(results[("peer", batch)])
        print(f"{batch:>14} {a:>15.1f} {b:>22.1f} {a / b:>6.2f}")


if __name__ == "__main__":
    main()
