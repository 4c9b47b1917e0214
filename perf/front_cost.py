"""The front's CPU per streamed token: what serving one token costs the Granian process (HTTP,
SSE, the event ring) apart from the engine, on the fake backend so the engine costs ~nothing.

On a 2-core machine every microsecond of front CPU per token is taken from the engine's decode,
so this is the figure to watch when the streaming path changes. One stream of ``--tokens`` words
at ``--step-ms`` per engine step (a real model's pace: SmolLM2 decodes a token in ~15 ms here);
CPU time is read from ``/proc`` for every process of the server's group but the engine.

With ``--rev REV`` the same is measured for another git revision (a temporary worktree, served
side by side), alternating round by round, and the ratio is printed; without it the reference
is the step interval: the share of one core the front takes per token.

    .venv/bin/python perf/front_cost.py [--rev BASE [--rev HEAD]] [--tokens 300] [--step-ms 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from perf.sse_client import stream_chat  # noqa: E402
from tests.server import Server, run_server  # noqa: E402


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(server: Server, tokens: int) -> tuple[float, float]:
    """Front and engine CPU seconds per delivered token, over one stream of ``tokens`` words."""
    engine = server.engine_pid()
    front = [p for p in server.group_pids() if p != engine]
    assert engine is not None
    words = " ".join(f"w{i}" for i in range(tokens))
    body = {"model": "default", "stream": True, "max_tokens": tokens + 8, "messages": [{"role": "user", "content": words}]}
    f0, e0 = sum(map(cpu_s, front)), cpu_s(engine)
    _, events = stream_chat(server.url, server.api_key, body)
    f1, e1 = sum(map(cpu_s, front)), cpu_s(engine)
    n = sum(1 for _, data in events if b'"content":"' in data and b'"content":""' not in data)
    assert n >= tokens * 0.9, (n, tokens)
    return (f1 - f0) / n, (e1 - e0) / n


@contextmanager
def worktree(rev: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="axs-front-cost-"))
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
    for so in (REPO / "ipc").glob("*.so"):  # the C extensions are built in place; share this build
        shutil.copy(so, path / "ipc")
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False)
        shutil.rmtree(path, ignore_errors=True)


def serve(stack: ExitStack, repo: Path, step_ms: float) -> Server:
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    return stack.enter_context(run_server(
        tmp, "--backend", "fake", "--backend-option", f"delay_ms={step_ms:g}", api_key="perf-key", cwd=repo,
    ))


def main() -> None:
    # `timeout` sends SIGTERM: exit through the context managers, so the servers they started stop.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", action="append", default=[],
                    help="another git revision to measure in the same run (repeatable: with two, their ratio "
                         "is printed as well, free of any bias of the checkout's own server)")
    ap.add_argument("--revs-only", action="store_true", help="measure the --rev revisions only, not this checkout")
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--step-ms", type=float, default=16.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with ExitStack() as stack:
        servers = {} if args.revs_only and args.rev else {"this": serve(stack, REPO, args.step_ms)}
        for rev in args.rev:
            servers[rev] = serve(stack, stack.enter_context(worktree(rev)), args.step_ms)
        for server in servers.values():
            measure(server, 20)  # warm-up
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
        order = list(servers.items())
        for _ in range(args.rounds):
            for name, server in order:  # ABBA: neither server always goes first
                results[name].append(measure(server, args.tokens))
            order.reverse()
    print(f"fake backend, one stream of {args.tokens} tokens at {args.step_ms:g} ms per step, "
          f"{args.rounds} rounds (medians; /proc CPU has 10 ms ticks, so use enough tokens)")
    print(f"{'server':<14}{'front us/token':>16}{'engine us/token':>17}{'front share of a core':>23}")
    med = {}
    for name, rows in results.items():
        front = statistics.median(f for f, _ in rows)
        engine = statistics.median(e for _, e in rows)
        med[name] = front
        print(f"{name:<14}{front * 1e6:>16.0f}{engine * 1e6:>17.0f}{front / (args.step_ms / 1000):>23.3f}")
    for rev in args.rev if "this" in med else ():
        print(f"front CPU per token, this / {rev}: x{med['this'] / med[rev]:.3f}")
    if len(args.rev) == 2:
        a, b = args.rev
        print(f"front CPU per token, {b} / {a}: x{med[b] / med[a]:.3f}")


if __name__ == "__main__":
    main()
