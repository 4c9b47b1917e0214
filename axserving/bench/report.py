"""Summaries of a bench run: per server and concurrency level, vLLM's serving metrics with
percentiles, failures by kind; the readable tables and the ours/theirs ratios."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from axserving.bench.client import Kind, Outcome

FAILURE_SAMPLES = 5


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on sorted values."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True)
class Dist:
    """A latency distribution, in milliseconds."""

    n: int
    mean: float
    p50: float
    p90: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, seconds: Iterable[float]) -> Dist | None:
        values = sorted(v * 1000 for v in seconds)
        if not values:
            return None
        return cls(
            n=len(values), mean=sum(values) / len(values), p50=percentile(values, 50), p90=percentile(values, 90),
            p95=percentile(values, 95), p99=percentile(values, 99), max=values[-1],
        )


@dataclass
class LevelSummary:
    target: str
    concurrency: int
    rounds: int
    requests: int
    ok: int
    errors: int  # HTTP errors, transport errors, error frames, unreadable replies
    empty: int
    truncated: int
    duration_s: float  # wall time of the level's rounds, summed
    request_throughput: float  # ok requests / s
    output_throughput: float  # output tokens of ok requests / s
    output_tokens: int  # of ok requests
    tokens_from: str  # "usage", "chunks" (server sent no usage), "mixed" or "none"
    ttft: Dist | None
    tpot: Dist | None
    itl: Dist | None
    e2e: Dist | None
    client_cpu_s: float  # this process's CPU time over the level (the load generator's own cost)
    failures: dict[str, int] = field(default_factory=dict)  # e.g. "http 503", "empty", "truncated"
    finish_reasons: dict[str, int] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)  # a few failure details
    group: str = ""  # the workload's kind of request ("" the main one; "long" for long-prompts' long ones)

    @property
    def failed(self) -> int:
        return self.errors + self.empty + self.truncated

    @property
    def level(self) -> str:
        """The concurrency level as the tables print it, with the group when there is one."""
        return f"{self.concurrency} {self.group}" if self.group else str(self.concurrency)


def _failure_key(o: Outcome) -> str:
    if o.kind is Kind.http_error:
        return f"http {o.http_status}"
    return o.kind.value


def summarize(
    target: str, concurrency: int, rounds: int, outcomes: Sequence[Outcome], duration_s: float, cpu_s: float,
    group: str = "",
) -> LevelSummary:
    ok = [o for o in outcomes if o.kind is Kind.ok]
    kinds = Counter(o.kind for o in outcomes)
    sources = {o.tokens_from for o in ok}
    tokens = sum(o.output_tokens for o in ok)
    failures = Counter(_failure_key(o) for o in outcomes if o.kind is not Kind.ok)
    samples = [
        f"#{o.index} {_failure_key(o)}: {o.detail}" for o in outcomes if o.kind is not Kind.ok
    ][:FAILURE_SAMPLES]
    return LevelSummary(
        target=target,
        concurrency=concurrency,
        rounds=rounds,
        requests=len(outcomes),
        ok=len(ok),
        errors=len(outcomes) - len(ok) - kinds[Kind.empty] - kinds[Kind.truncated],
        empty=kinds[Kind.empty],
        truncated=kinds[Kind.truncated],
        duration_s=duration_s,
        request_throughput=len(ok) / duration_s if duration_s > 0 else 0.0,
        output_throughput=tokens / duration_s if duration_s > 0 else 0.0,
        output_tokens=tokens,
        tokens_from=sources.pop() if len(sources) == 1 else ("mixed" if sources else "none"),
        ttft=Dist.of(o.ttft for o in ok if o.ttft is not None),
        tpot=Dist.of(t for o in ok if (t := o.tpot) is not None),
        itl=Dist.of(gap for o in ok for gap in o.itl),
        e2e=Dist.of(o.e2e for o in ok),
        client_cpu_s=cpu_s,
        failures=dict(failures),
        finish_reasons=dict(Counter(str(o.finish_reason) for o in outcomes if o.http_status == 200)),
        samples=samples,
        group=group,
    )


@dataclass(frozen=True)
class Ratio:
    """ours / theirs at one concurrency level (throughput: higher is better for ours; latencies: lower)."""

    concurrency: int
    ok: str  # "ours ok/requests vs theirs ok/requests": a ratio over few successes says little
    request_throughput: float | None
    output_throughput: float | None
    ttft_p50: float | None
    ttft_p95: float | None
    itl_p99: float | None = None
    theirs: str = "peer"
    group: str = ""

    @property
    def level(self) -> str:
        return f"{self.concurrency} {self.group}" if self.group else str(self.concurrency)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def ratios(ours: Sequence[LevelSummary], theirs: Sequence[LevelSummary], name: str = "peer") -> list[Ratio]:
    by_level = {(s.concurrency, s.group): s for s in theirs}
    out = []
    for a in ours:
        b = by_level.get((a.concurrency, a.group))
        if b is None:
            continue
        out.append(Ratio(
            concurrency=a.concurrency,
            ok=f"{a.ok}/{a.requests} vs {b.ok}/{b.requests}",
            request_throughput=_ratio(a.request_throughput, b.request_throughput),
            output_throughput=_ratio(a.output_throughput, b.output_throughput),
            ttft_p50=_ratio(a.ttft.p50 if a.ttft else None, b.ttft.p50 if b.ttft else None),
            ttft_p95=_ratio(a.ttft.p95 if a.ttft else None, b.ttft.p95 if b.ttft else None),
            itl_p99=_ratio(a.itl.p99 if a.itl else None, b.itl.p99 if b.itl else None),
            theirs=name,
            group=a.group,
        ))
    return out


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.{digits}f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(header), *(list(r) for r in rows)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(summaries: Sequence[LevelSummary], compare: Sequence[Ratio] = ()) -> str:
    """The readable report: a summary row per server and level, the latency distributions, the
    failures and (with two servers) the ratios."""
    out = [_table(
        ["server", "conc", "ok/req", "err", "empty", "trunc", "req/s", "out tok/s", "tokens", "TTFT p50",
         "TTFT p99", "TPOT p50", "E2E p50", "client cpu"],
        [
            [s.target, s.level, f"{s.ok}/{s.requests}", str(s.errors), str(s.empty), str(s.truncated),
             _fmt(s.request_throughput, 2), _fmt(s.output_throughput), f"{s.output_tokens} ({s.tokens_from})",
             _fmt(s.ttft.p50 if s.ttft else None), _fmt(s.ttft.p99 if s.ttft else None),
             _fmt(s.tpot.p50 if s.tpot else None, 2), _fmt(s.e2e.p50 if s.e2e else None, 0),
             f"{s.client_cpu_s:.2f}s"]
            for s in summaries
        ],
    ), "", "latencies in ms over successful requests (TPOT excludes the first token; ITL per content chunk):"]
    rows = []
    for s in summaries:
        for name, d in (("TTFT", s.ttft), ("TPOT", s.tpot), ("ITL", s.itl), ("E2E", s.e2e)):
            if d is not None:
                rows.append([s.target, s.level, name, str(d.n), _fmt(d.mean, 2), _fmt(d.p50, 2),
                             _fmt(d.p90, 2), _fmt(d.p95, 2), _fmt(d.p99, 2), _fmt(d.max, 2)])
    out.append(_table(["server", "conc", "metric", "n", "mean", "p50", "p90", "p95", "p99", "max"], rows))
    failing = [s for s in summaries if s.failed or s.samples]
    if failing:
        out += ["", "failures:"]
        for s in failing:
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(s.failures.items()))
            out.append(f"  {s.target} conc {s.level}: {kinds}")
            out += [f"    {line}" for line in s.samples]
    reasons = [f"  {s.target} conc {s.level}: "
               + (", ".join(f"{k} {v}" for k, v in sorted(s.finish_reasons.items())) or "(no 200 replies)")
               for s in summaries]
    out += ["", "finish reasons (HTTP 200 replies):", *reasons]
    if compare:
        out += ["", "ours / theirs (throughput: > 1 is better for ours; latencies: < 1 is better for ours):", _table(
            ["vs", "conc", "ok", "req/s", "out tok/s", "TTFT p50", "TTFT p95", "ITL p99"],
            [[r.theirs, r.level, r.ok, _fmt(r.request_throughput, 2), _fmt(r.output_throughput, 2),
              _fmt(r.ttft_p50, 3), _fmt(r.ttft_p95, 3), _fmt(r.itl_p99, 3)] for r in compare],
        )]
    return "\n".join(out)
