"""The front's CPU per streamed token: what serving one token costs the Granian process (HTTP,
SSE, the event ring) apart from the engine, on the fake backend so the engine costs ~nothing.

On a 2-core machine every microsecond of front CPU per token is taken from the engine's decode,
so this is the figure to watch when the streaming path changes. ``--streams`` streams (1) of
``--tokens`` words at ``--step-ms`` per engine step (a real model's pace: SmolLM2 decodes a token
in ~15 ms here alone, ~50 ms a step for 8 streams); CPU time is read from ``/proc`` for every
process of the server's group but the engine. The floor is printed beside it: what an idle
uvloop process spends per timed wake-up on this machine (a VM here: ~200 us), which a server
sending one event per token at one stream cannot go under.

With ``--rev REV`` the same is measured for another git revision (a temporary worktree, served
side by side), alternating round by round, and the ratio is printed; without it the reference
is the step interval: the share of one core the front takes per token.

With ``--ceiling``, the front at full speed instead: ``--streams`` streams at once on the fake
backend with no step delay, and the same events (one of our streams, replayed) pushed by a bare
Granian + Starlette app (``perf/bare_sse.py``); prints both chunk rates and ours as a fraction.

    .venv/bin/python perf/front_cost.py [--rev BASE [--rev HEAD]] [--tokens 300] [--step-ms 16] [--rounds 3]
        [--streams 1]
    .venv/bin/python perf/front_cost.py --ceiling [--streams 64] [--tokens 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import orjson  # noqa: E402

from perf.sse_client import http_request, stream_chat  # noqa: E402
from tests.server import Server, free_port, run_server  # noqa: E402


def cpu_s(pid: int) -> float:
    """CPU seconds of a process's live threads, to the nanosecond (the scheduler's own runtime,
    ``/proc/PID/task/TID/schedstat``): ``/proc/PID/stat`` counts 10 ms ticks, which at one stream
    of 300 tokens is +-30 us a token. Falls back to the ticks where schedstat is missing."""
    total, seen = 0, False
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
                seen = True
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    if seen:
        return total / 1e9
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(server: Server, tokens: int, streams: int = 1) -> tuple[float, float]:
    """Front and engine CPU seconds per delivered token, over ``streams`` concurrent streams of
    ``tokens`` words each."""
    engine = server.engine_pid()
    front = [p for p in server.group_pids() if p != engine]
    assert engine is not None
    words = " ".join(f"w{i}" for i in range(tokens))
    body = {"model": "default", "stream": True, "max_tokens": tokens + 8, "messages": [{"role": "user", "content": words}]}
    f0, e0 = sum(map(cpu_s, front)), cpu_s(engine)
    if streams == 1:
        _, events = stream_chat(server.url, server.api_key, body)
        n = sum(1 for _, data in events if b'"content":"' in data and b'"content":""' not in data)
    else:
        _, n = token_rate(server.url, server.api_key, body, streams)
    f1, e1 = sum(map(cpu_s, front)), cpu_s(engine)
    assert n >= tokens * streams * 0.9, (n, tokens, streams)
    return (f1 - f0) / n, (e1 - e0) / n


_WAKE = """
import asyncio, sys, time
import uvloop
async def main(n, step):
    t = time.process_time()
    for _ in range(n):
        await asyncio.sleep(step)
    print(time.process_time() - t)
uvloop.run(main(int(sys.argv[1]), float(sys.argv[2])))
"""


def wake_floor_s(step_ms: float, n: int) -> float:
    """CPU seconds an idle uvloop process spends per timed wake-up at ``step_ms``: what any
    event-loop server pays on this machine per event it sends at that pace, before any work."""
    out = subprocess.check_output([sys.executable, "-c", _WAKE, str(n), str(step_ms / 1000)], text=True)
    return float(out) / n


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


def serve(stack: ExitStack, repo: Path, step_ms: float, *args: str) -> Server:
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    return stack.enter_context(run_server(
        tmp, "--backend", "fake", "--backend-option", f"delay_ms={step_ms:g}", *args, api_key="perf-key", cwd=repo,
    ))


async def _read_all(host: str, port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request)
    parts = []
    while data := await reader.read(1 << 16):
        parts.append(data)
    writer.close()
    return b"".join(parts)


def token_rate(url: str, key: str | None, body: dict[str, object], streams: int) -> tuple[float, int]:
    """``streams`` concurrent streams of ``body``: content tokens per second over all, and the
    total. The client is asyncio on raw sockets and counts only after the streams end."""
    host, port, request = http_request(url, key, body)

    async def run() -> tuple[float, list[bytes]]:
        t0 = time.perf_counter()
        replies = await asyncio.gather(*(_read_all(host, port, request) for _ in range(streams)))
        return time.perf_counter() - t0, replies

    wall, replies = asyncio.run(run())
    # Content tokens: the fake backend echoes one word per token ("w17 "), however the front
    # merged them into events; the bare app's replayed events carry one each.
    tokens = sum(r.count(b" w") + r.count(b'"w') for r in replies)
    return tokens / wall, tokens


@contextmanager
def bare_server(events: list[bytes]) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.json"
        path.write_bytes(orjson.dumps([e.decode() for e in events]))
        port = free_port()
        proc = subprocess.Popen([sys.executable, str(REPO / "perf" / "bare_sse.py"), str(port), str(path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    stream_chat(url, None, {})
                    break
                except (OSError, RuntimeError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            yield url, proc
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)


def group_cpu_s(pid: int) -> float:
    return sum(cpu_s(int(p)) for p in subprocess.check_output(["pgrep", "-g", str(os.getpgid(pid))]).split())


def ceiling(args: argparse.Namespace) -> None:
    words = " ".join(f"w{i}" for i in range(args.tokens))
    body = {"model": "default", "stream": True, "max_tokens": args.tokens + 8,
            "messages": [{"role": "user", "content": words}]}
    with ExitStack() as stack:
        with ExitStack() as paced:  # one token per event: what the bare app replays
            capture = serve(paced, REPO, 2)
            _, events = stream_chat(capture.url, capture.api_key, body)
        ours = serve(stack, REPO, 0, "--max-batch", str(args.streams))
        bare_url, bare = stack.enter_context(bare_server([data for _, data in events]))
        runs: dict[str, list[tuple[float, float]]] = {"ours": [], "bare": []}
        targets = [("ours", ours.url, ours.api_key, ours.proc.pid), ("bare", bare_url, None, bare.pid)]
        for name, url, key, _ in targets:
            token_rate(url, key, body, 4)  # warm-up
        for _ in range(args.rounds):
            for name, url, key, pid in targets:
                c0 = group_cpu_s(pid)
                rate, n = token_rate(url, key, body, args.streams)
                runs[name].append((rate, (group_cpu_s(pid) - c0) / n))
            targets.reverse()
    print(f"{args.streams} streams of {args.tokens} tokens at full speed (fake backend, no step delay, "
          f"max_batch {args.streams}) against a bare app pushing one event per token, {args.rounds} rounds, medians")
    print(f"{'server':<8}{'tokens/s':>10}{'server CPU us/token':>21}")
    med = {}
    for name, rows in runs.items():
        med[name] = statistics.median(r for r, _ in rows)
        cpu = statistics.median(c for _, c in rows)
        print(f"{name:<8}{med[name]:>10.0f}{cpu * 1e6:>21.1f}")
    print(f"ours / bare Granian + Starlette: x{med['ours'] / med['bare']:.3f} of its token rate "
          "(ours merges tokens that wait into one event; its CPU includes the fake engine process)")


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
    ap.add_argument("--ceiling", action="store_true", help="full speed, many streams, against a bare Granian app")
    ap.add_argument("--streams", type=int, help="concurrent streams (default 1; --ceiling: 64)")
    args = ap.parse_args()
    if args.ceiling:
        args.streams = args.streams or 64
        ceiling(args)
        return
    streams = args.streams or 1
    batch = ("--max-batch", str(max(streams, 8)))
    with ExitStack() as stack:
        servers = {} if args.revs_only and args.rev else {"this": serve(stack, REPO, args.step_ms, *batch)}
        for rev in args.rev:
            servers[rev] = serve(stack, stack.enter_context(worktree(rev)), args.step_ms, *batch)
        for server in servers.values():
            measure(server, 20)  # warm-up
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
        floors: list[float] = []
        order = list(servers.items())
        for _ in range(args.rounds):
            for name, server in order:  # ABBA: neither server always goes first
                results[name].append(measure(server, args.tokens, streams))
            order.reverse()
            floors.append(wake_floor_s(args.step_ms, args.tokens))
    print(f"fake backend, {streams} stream(s) of {args.tokens} tokens at {args.step_ms:g} ms per step, "
          f"{args.rounds} rounds (medians; CPU from the scheduler's runtime of each thread)")
    print(f"{'server':<14}{'front us/token':>16}{'engine us/token':>17}{'front share of a core':>23}")
    med = {}
    rate = streams / (args.step_ms / 1000)  # tokens a second the front delivers
    for name, rows in results.items():
        front = statistics.median(f for f, _ in rows)
        engine = statistics.median(e for _, e in rows)
        med[name] = front
        print(f"{name:<14}{front * 1e6:>16.0f}{engine * 1e6:>17.0f}{front * rate:>23.3f}")
    floor = statistics.median(floors)
    print(f"an idle uvloop process woken every {args.step_ms:g} ms spends {floor * 1e6:.0f} us per wake-up here "
          f"(the floor for one event per token at one stream; with more streams one wake-up serves several)")
    for rev in args.rev if "this" in med else ():
        print(f"front CPU per token, this / {rev}: x{med['this'] / med[rev]:.3f}")
    if len(args.rev) == 2:
        a, b = args.rev
        print(f"front CPU per token, {b} / {a}: x{med[b] / med[a]:.3f}")


if __name__ == "__main__":
    main()
