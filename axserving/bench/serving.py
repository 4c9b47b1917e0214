"""Serving benchmark: load on any OpenAI-compatible server at several concurrency levels.

For each level, ``c`` workers send requests back to back (a request count, or for a duration),
each with its own prompt; the report gives vLLM's serving metrics (TTFT, TPOT, ITL, e2e latency:
mean, p50, p90, p95, p99; request and output-token throughput) over the successful requests, and
counts failures by kind: HTTP errors, error frames, and 200 replies that delivered nothing (empty)
or stopped early (truncated), so a server that answers 200 with nothing is caught, not timed.

With ``--compare URL`` the same workload runs against a second server too, the two alternating
level by level (and round by round, the order flipping each time) so that machine noise hits both
alike; the report ends with ours/theirs ratios. Run it against ``axserving run`` and
llama-cpp-python's own server on the same model and threads (``pip install -e '.[perf]'``)::

    AXS_API_KEY=sk-local .venv/bin/axserving run --threads 2 &
    .venv/bin/python -m llama_cpp.server --model "$(.venv/bin/axserving models path)" \\
        --n_threads 2 --port 18081 &
    .venv/bin/python perf/bench_serving.py --url http://127.0.0.1:18080 --api-key sk-local \\
        --compare http://127.0.0.1:18081 --eos-token-id 2 --concurrency 1,4,8 --json bench.json

(``axserving bench serve`` takes the same flags.) ``llama_cpp.server`` ignores ``ignore_eos``;
``--eos-token-id`` also sends a ``logit_bias`` that forbids the model's end token (2 is
SmolLM2-Instruct's ``<|im_end|>``), so both servers generate ``--max-tokens`` for every request.
It also serializes requests, and by default (``--interrupt_requests True``) a new request cuts the
running stream off: those come back as 200 with no content (closed connection), counted as empty.
Pass ``--interrupt_requests False`` to measure it queueing instead.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
import orjson

from axserving.bench import workload
from axserving.bench.client import Call, Kind, Outcome, send
from axserving.bench.options import BenchConfig, Target, Workload, add_arguments, config_from_args
from axserving.bench.report import LevelSummary, Ratio, ratios, render, summarize

SETTLE_S = 0.5  # between runs, so one server's tail does not overlap the other's start
WARMUP_INDEX = 1_000_000_000  # warm-up prompts never share an index with measured ones


def call_for(cfg: BenchConfig, target: Target) -> Call:
    headers = {"Content-Type": "application/json"}
    if target.api_key:
        headers["Authorization"] = f"Bearer {target.api_key}"
    return Call(
        url=target.v1 + workload.path(cfg), headers=headers, chat=cfg.endpoint.value == "chat",
        stream=cfg.stream, max_tokens=cfg.max_tokens, ignore_eos=cfg.ignore_eos,
        keep_text=cfg.workload is Workload.chat_shared_prefix,
    )


@dataclasses.dataclass
class _Run:
    outcomes: list[Outcome]
    duration_s: float
    cpu_s: float
    next_index: int  # the first request index the next round may use


class _Quota:
    """Hands out a level's request indices until its count or its deadline is reached."""

    def __init__(self, first: int, count: int | None, deadline: float | None) -> None:
        self.first, self.next, self.count, self.deadline = first, first, count, deadline

    def take(self) -> int | None:
        if self.count is not None and self.next - self.first >= self.count:
            return None
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            return None
        index, self.next = self.next, self.next + 1
        return index


async def run_level(
    client: httpx.AsyncClient, cfg: BenchConfig, target: Target, concurrency: int, first_index: int
) -> _Run:
    """One level of ``cfg.workload`` against ``target``: ``concurrency`` workers (or requests in
    flight, or conversations) until the count (or duration) is reached; request indices start
    at ``first_index``."""
    call = call_for(cfg, target)
    outcomes: list[Outcome] = []
    t0 = time.perf_counter()
    count = cfg.requests_for(concurrency) if cfg.duration_s is None else None
    quota = _Quota(first_index, count, t0 + cfg.duration_s if cfg.duration_s is not None else None)
    last_index = first_index - 1

    async def one(index: int, group: str = "", **body: Any) -> Outcome:
        nonlocal last_index
        if not group:
            last_index = max(last_index, index)
        outcome = await send(client, call, index, workload.request_body(cfg, target, index, **body))
        outcome.group = group
        outcomes.append(outcome)
        return outcome

    async def closed_worker() -> None:
        while (index := quota.take()) is not None:
            await one(index)

    async def open_loop() -> None:
        in_flight = asyncio.Semaphore(concurrency)
        gaps = workload.arrival_gaps(cfg, first_index)
        arrival = time.perf_counter()

        async def admitted(index: int) -> None:
            try:
                await one(index)
            finally:
                in_flight.release()

        async with asyncio.TaskGroup() as tg:
            while True:
                arrival += next(gaps)
                await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
                await in_flight.acquire()  # at the cap, the arrival waits for a request to end
                index = quota.take()
                if index is None:
                    in_flight.release()
                    return
                tg.create_task(admitted(index), name=f"bench-{target.name}-r{index}")

    system = workload.system_prompt(cfg.system_words)
    conversations = iter(range(1_000_000))

    async def conversation_worker() -> None:
        # Each conversation's prompts come from its own indices, so every server sees the same
        # user turns whatever order the workers pick conversations up in.
        while True:
            k = next(conversations)
            messages = [{"role": "system", "content": system}]
            for turn in range(cfg.turns):
                if quota.take() is None:
                    return
                index = first_index + k * cfg.turns + turn
                text = workload.prompt_text(index, cfg.prompt_words, cfg.prompt_salt)
                messages.append({"role": "user", "content": text})
                outcome = await one(index, messages=list(messages))
                if outcome.kind is not Kind.ok:
                    break  # a broken turn ends the conversation; the next one starts afresh
                messages.append({"role": "assistant", "content": outcome.text})

    shorts_done = asyncio.Event()

    async def long_prompt_worker() -> None:
        k = 0
        while not shorts_done.is_set():
            try:
                await asyncio.wait_for(shorts_done.wait(), cfg.long_interval_s)
                return
            except TimeoutError:
                pass
            await one(workload.LONG_INDEX + first_index + k, "long", words=cfg.long_words,
                      max_tokens=cfg.long_max_tokens)
            k += 1

    async def shorts(worker: Callable[[], Awaitable[None]]) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for w in range(concurrency):
                    tg.create_task(worker(), name=f"bench-{target.name}-c{concurrency}-w{w}")
        finally:
            shorts_done.set()

    cpu0 = time.process_time()
    if cfg.rate is not None:
        await open_loop()
    elif cfg.workload is Workload.chat_shared_prefix:
        await shorts(conversation_worker)
    elif cfg.workload is Workload.long_prompts:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(shorts(closed_worker))
            tg.create_task(long_prompt_worker())
    else:
        await shorts(closed_worker)
    return _Run(
        sorted(outcomes, key=lambda o: o.index), time.perf_counter() - t0, time.process_time() - cpu0,
        max(quota.next, last_index + 1),
    )


async def warm_up(client: httpx.AsyncClient, cfg: BenchConfig, target: Target) -> None:
    call = call_for(cfg, target)
    for k in range(cfg.warmup):
        await send(client, call, WARMUP_INDEX + k, workload.request_body(cfg, target, WARMUP_INDEX + k))


@dataclasses.dataclass
class BenchResult:
    config: BenchConfig
    summaries: list[LevelSummary]
    ratios: list[Ratio]

    def for_target(self, name: str) -> list[LevelSummary]:
        return [s for s in self.summaries if s.target == name]

    def to_json(self) -> bytes:
        body: dict[str, Any] = {
            "config": dataclasses.asdict(self.config),
            "levels": [dataclasses.asdict(s) for s in self.summaries],
            "ratios": [dataclasses.asdict(r) for r in self.ratios],
        }
        for t in body["config"]["targets"]:
            t["api_key"] = "***" if t["api_key"] else None
        return orjson.dumps(body, option=orjson.OPT_INDENT_2)


def _progress(cfg: BenchConfig, message: str) -> None:
    if not cfg.quiet:
        print(message, file=sys.stderr, flush=True)


async def run(cfg: BenchConfig) -> BenchResult:
    """Run every level against every target, alternating targets, and summarize."""
    limits = httpx.Limits(max_connections=max(cfg.concurrency) * len(cfg.targets) + 4,
                          max_keepalive_connections=max(cfg.concurrency) * len(cfg.targets) + 4)
    timeout = httpx.Timeout(cfg.timeout_s, connect=min(cfg.timeout_s, 30.0))
    # One client for the whole run: a client per request costs tens of ms of CPU here.
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        for target in cfg.targets:
            _progress(cfg, f"[{target.name}] warm-up: {cfg.warmup} request(s) to {target.v1}")
            await warm_up(client, cfg, target)
        runs: dict[tuple[str, int], list[_Run]] = {}
        next_index = dict.fromkeys((t.name for t in cfg.targets), 0)
        turn = 0
        for concurrency in cfg.concurrency:
            for rnd in range(cfg.rounds):
                # The order rotates level by level and round by round: no server always goes first.
                shift = turn % len(cfg.targets)
                order = cfg.targets[shift:] + cfg.targets[:shift]
                turn += 1
                for target in order:
                    await asyncio.sleep(SETTLE_S)
                    r = await run_level(client, cfg, target, concurrency, next_index[target.name])
                    next_index[target.name] = r.next_index
                    runs.setdefault((target.name, concurrency), []).append(r)
                    bad = sum(o.kind.value != "ok" for o in r.outcomes)
                    _progress(cfg, f"[{target.name}] conc {concurrency} round {rnd + 1}/{cfg.rounds}: "
                                   f"{len(r.outcomes)} requests in {r.duration_s:.1f} s, {bad} failed")
    summaries = []
    for target in cfg.targets:
        for concurrency in cfg.concurrency:
            level = runs[(target.name, concurrency)]
            outcomes = [o for r in level for o in r.outcomes]
            duration = sum(r.duration_s for r in level)
            cpu = sum(r.cpu_s for r in level)
            for group in sorted({o.group for o in outcomes} | {""}):
                summaries.append(summarize(
                    target.name, concurrency, cfg.rounds, [o for o in outcomes if o.group == group], duration, cpu,
                    group=group,
                ))
    result = BenchResult(cfg, summaries, [])
    ours = cfg.targets[0].name
    for peer in cfg.targets[1:]:
        result.ratios += ratios(result.for_target(ours), result.for_target(peer.name), peer.name)
    return result


def run_sync(cfg: BenchConfig) -> BenchResult:
    """:func:`run` on a fresh event loop (uvloop where installed: less client CPU per chunk)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run(cfg))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run(cfg))


def main_with_args(args: argparse.Namespace) -> int:
    """Entry point once flags are parsed (shared by ``axserving bench serve``)."""
    env_key = (os.environ.get("AXS_API_KEY") or "").split(",")[0].strip() or None
    try:
        cfg = config_from_args(args, env_api_key=env_key)
    except ValueError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    baseline = getattr(args, "baseline", None)
    if baseline is not None and not os.path.isfile(baseline):
        print(f"bench: error: --baseline {baseline}: no such file", file=sys.stderr)
        return 2
    result = run_sync(cfg)
    print(render(result.summaries, result.ratios))
    if cfg.json_path:
        with open(cfg.json_path, "wb") as f:
            f.write(result.to_json())
        _progress(cfg, f"results written to {cfg.json_path}")
    plot = getattr(args, "plot", None)
    if plot:
        from axserving.bench.plot import write_png

        names = " vs ".join(t.name for t in cfg.targets)
        write_png(plot, result.summaries, f"{names}: {cfg.workload.value}, {cfg.max_tokens} max tokens")
        _progress(cfg, f"plot written to {plot}")
    # Exit 1 when the server under test failed any request (the peer's failures are only reported).
    failed = any(s.failed for s in result.for_target(cfg.targets[0].name))
    if baseline is not None:
        from axserving.bench import regress

        report, regressed = regress.check_files(baseline, orjson.loads(result.to_json()), args.tolerance)
        print("\nagainst the baseline " + baseline + ":\n" + report)
        failed = failed or regressed
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_serving", description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_arguments(parser)
    return main_with_args(parser.parse_args(argv))
