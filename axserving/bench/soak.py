"""``axserving bench soak``: steady load for a long time, watching for drift.

The fixed workload's workers send back to back for ``--duration`` seconds; requests are binned
by when they ended into windows of ``--window`` seconds. Each window reports its throughput and
p95 latencies, and the server's memory (front and engines' RSS from axserving's
``/v1/metrics``; other servers report none). The verdict compares the last window with the
first: the p95 drift and the RSS growth, failing (exit 1) on any failed request or past the
limits given (``--max-p95-drift``, ``--max-rss-growth``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field

import httpx

from axserving.bench import workload
from axserving.bench.client import Kind, Outcome, send
from axserving.bench.options import BenchConfig, Target, Workload, add_arguments, config_from_args
from axserving.bench.report import Dist


@dataclass
class Window:
    index: int
    outcomes: list[Outcome] = field(default_factory=list)
    rss_bytes: int | None = None

    @property
    def failed(self) -> int:
        return sum(o.kind is not Kind.ok for o in self.outcomes)

    def tokens(self) -> int:
        return sum(o.output_tokens for o in self.outcomes if o.kind is Kind.ok)

    def p95(self, what: str) -> float | None:
        ok = [o for o in self.outcomes if o.kind is Kind.ok]
        values = [o.ttft for o in ok if o.ttft is not None] if what == "ttft" else [o.e2e for o in ok]
        d = Dist.of(values)
        return d.p95 if d else None


async def _rss(client: httpx.AsyncClient, target: Target) -> int | None:
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    try:
        r = await client.get(target.v1 + "/metrics", headers=headers)
        body = r.json()
        return int(body["rss_bytes"]) + int(body.get("engines_rss_bytes") or 0)
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None  # not axserving, or not reachable now: the window has no memory figure


async def soak(cfg: BenchConfig, concurrency: int, duration_s: float, window_s: float) -> list[Window]:
    from axserving.bench.serving import call_for, warm_up

    target = cfg.targets[0]
    n_windows = max(1, int(-(-duration_s // window_s)))
    windows = [Window(k) for k in range(n_windows)]
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(cfg.timeout_s), trust_env=False) as client:
        await warm_up(client, cfg, target)
        call = call_for(cfg, target)
        t0 = time.perf_counter()
        deadline = t0 + duration_s
        counter = iter(range(10**9))

        async def worker() -> None:
            while time.perf_counter() < deadline:
                index = next(counter)
                outcome = await send(client, call, index, workload.request_body(cfg, target, index))
                k = min(int((time.perf_counter() - t0) // window_s), n_windows - 1)
                windows[k].outcomes.append(outcome)

        async def sampler() -> None:
            for w in windows:
                await asyncio.sleep(max(0.0, t0 + (w.index + 1) * window_s - time.perf_counter()))
                w.rss_bytes = await _rss(client, target)
                if not cfg.quiet:
                    print(f"soak: window {w.index + 1}/{n_windows}: {len(w.outcomes)} requests, "
                          f"{w.failed} failed", file=sys.stderr, flush=True)

        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(worker())
            tg.create_task(sampler())
    return windows


def render(windows: list[Window], window_s: float) -> tuple[str, dict[str, float | None]]:
    def f(v: float | None, d: int = 1) -> str:
        return "-" if v is None else f"{v:.{d}f}"

    lines = [f"{'window':>6} {'requests':>8} {'failed':>6} {'out tok/s':>9} {'TTFT p95':>9} {'E2E p95':>9} {'RSS MiB':>8}"]
    for w in windows:
        rss = w.rss_bytes / 2**20 if w.rss_bytes is not None else None
        lines.append(f"{w.index + 1:>6} {len(w.outcomes):>8} {w.failed:>6} {w.tokens() / window_s:>9.1f} "
                     f"{f(w.p95('ttft')):>9} {f(w.p95('e2e')):>9} {f(rss):>8}")
    first, last = windows[0], windows[-1]

    def drift(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or a == 0 else b / a - 1

    figures = {
        "ttft_p95_drift": drift(first.p95("ttft"), last.p95("ttft")),
        "e2e_p95_drift": drift(first.p95("e2e"), last.p95("e2e")),
        "rss_growth": drift(first.rss_bytes, last.rss_bytes),
        "rss_growth_bytes": (
            float(last.rss_bytes - first.rss_bytes) if first.rss_bytes is not None and last.rss_bytes is not None else None
        ),
    }
    pct = {k: "-" if v is None else f"{v * 100:+.1f}%" for k, v in figures.items() if k != "rss_growth_bytes"}
    grown = figures["rss_growth_bytes"]
    lines.append(f"\nlast window against the first: TTFT p95 {pct['ttft_p95_drift']}, E2E p95 {pct['e2e_p95_drift']}, "
                 f"RSS {pct['rss_growth']}" + ("" if grown is None else f" ({grown / 2**20:+.1f} MiB)"))
    return "\n".join(lines), figures


def add_soak_arguments(p: argparse.ArgumentParser) -> None:
    add_arguments(p)
    p.add_argument("--window", type=float, default=60.0, help="seconds per reported window (default 60)")
    p.add_argument("--max-p95-drift", type=float, metavar="R",
                   help="fail when the last window's TTFT or E2E p95 exceeds the first's by more than R (0.5 = 50%%)")
    p.add_argument("--max-rss-growth", type=float, metavar="R",
                   help="fail when the server's RSS grew by more than R over the run (0.2 = 20%%)")


def main_with_args(args: argparse.Namespace, env_api_key: str | None) -> int:
    try:
        cfg = config_from_args(args, env_api_key=env_api_key)
        if args.duration is None:
            raise ValueError("soak needs --duration (seconds)")
        if cfg.workload is not Workload.fixed or cfg.rate is not None or len(cfg.targets) > 1:
            raise ValueError("soak runs the fixed workload against one server (no --workload, --rate or --compare)")
        if len(cfg.concurrency) != 1:
            raise ValueError("soak runs at one --concurrency")
        if not 0 < args.window <= args.duration:
            raise ValueError(f"--window = {args.window}: must be in (0, --duration]")
    except ValueError as e:
        print(f"bench soak: error: {e}", file=sys.stderr)
        return 2
    windows = asyncio.run(soak(cfg, cfg.concurrency[0], args.duration, args.window))
    text, figures = render(windows, args.window)
    print(text)
    bad = []
    if any(w.failed for w in windows):
        bad.append(f"{sum(w.failed for w in windows)} failed request(s)")
    if args.max_p95_drift is not None:
        for key in ("ttft_p95_drift", "e2e_p95_drift"):
            value = figures[key]
            if value is not None and value > args.max_p95_drift:
                bad.append(f"{key} {value:+.2f} > {args.max_p95_drift}")
    growth = figures["rss_growth"]
    if args.max_rss_growth is not None and growth is not None and growth > args.max_rss_growth:
        bad.append(f"rss_growth {growth:+.2f} > {args.max_rss_growth}")
    print("verdict: " + ("; ".join(bad) if bad else "steady"))
    return 1 if bad else 0
