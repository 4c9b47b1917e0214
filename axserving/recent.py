"""The last minutes in figures, for ``GET /v1/metrics``, the dashboard and ``axserving top``:
percentiles over a bounded window of finished requests (Prometheus histograms give buckets, not
exact quantiles), and a timeline sampled every few seconds (throughput, queue, TTFT).

Everything here is bounded: the window keeps the last :data:`SAMPLES` requests and
:data:`ITL_SAMPLES` token gaps, the timeline the last :data:`POINTS` points.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("axserving.recent")

SAMPLES = 4096
ITL_SAMPLES = 16384
POINTS = 300
TICK_S = 2.0  # the timeline's resolution: 300 points are 10 minutes
WINDOW_S = 300.0  # the percentiles' window


@dataclass(frozen=True, slots=True)
class RequestSample:
    ts: float  # unix time it ended
    model: str
    status: int
    e2e: float  # seconds
    queue_wait: float | None
    ttft: float | None
    tpot: float | None
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Point:
    ts: float  # unix time
    generation_tps: float  # tokens generated per second over the last tick
    prompt_tps: float  # prompt tokens of the requests that ended in the tick, per second
    requests_ps: float  # requests ended per second
    errors: int  # requests that ended with a status >= 400 in the tick
    queue_depth: int
    inflight: int
    ttft_p50_ms: float | None  # of the requests that ended in the tick


def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of a sorted, non-empty list."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def quantiles(values: Iterable[float], scale: float = 1e6) -> dict[str, float | int]:
    """``{count, p50, p95, p99, mean}``, in ``scale`` units (µs by default); zeros when empty."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "p50": 0, "p95": 0, "p99": 0, "mean": 0}
    out: dict[str, float | int] = {"count": len(ordered)}
    for p in (50, 95, 99):
        out[f"p{p}"] = round(percentile(ordered, p) * scale, 1)
    out["mean"] = round(sum(ordered) / len(ordered) * scale, 1)
    return out


class Recent:
    def __init__(self) -> None:
        self.samples: deque[RequestSample] = deque(maxlen=SAMPLES)
        self.itl: deque[tuple[str, float]] = deque(maxlen=ITL_SAMPLES)
        self.timeline: deque[Point] = deque(maxlen=POINTS)
        self.generated = 0  # tokens generated since start (streamed ones as they go)
        self.ended = 0  # requests ended since start
        self._tick_at = time.monotonic()
        self._tick_generated = 0
        self._tick_ended = 0

    def add(self, sample: RequestSample, itl: list[float]) -> None:
        self.samples.append(sample)
        self.ended += 1
        if itl:
            model = sample.model
            self.itl.extend((model, gap) for gap in itl)

    def tick(self, queue_depth: int, inflight: int) -> Point:
        """A timeline point for the time since the last one."""
        now = time.monotonic()
        span = max(now - self._tick_at, 1e-3)
        new = self.ended - self._tick_ended
        ended = list(self.samples)[-new:] if new > 0 else []
        ttfts = sorted(s.ttft for s in ended if s.ttft is not None)
        point = Point(
            ts=round(time.time(), 3),
            generation_tps=round((self.generated - self._tick_generated) / span, 2),
            prompt_tps=round(sum(s.prompt_tokens for s in ended) / span, 2),
            requests_ps=round(new / span, 3),
            errors=sum(1 for s in ended if s.status >= 400),
            queue_depth=queue_depth,
            inflight=inflight,
            ttft_p50_ms=round(percentile(ttfts, 50) * 1000, 2) if ttfts else None,
        )
        self._tick_at, self._tick_generated, self._tick_ended = now, self.generated, self.ended
        self.timeline.append(point)
        return point

    def summary(self, model: str | None = None, window_s: float = WINDOW_S) -> dict[str, Any]:
        """Percentiles (µs) and rates over the last ``window_s`` seconds, for one model or all."""
        since = time.time() - window_s
        samples = [s for s in self.samples if s.ts >= since and (model is None or s.model == model)]
        done = [s for s in samples if s.status < 400]
        itl = [gap for m, gap in self.itl if model is None or m == model]
        return {
            "window_secs": window_s,
            "requests": len(samples),
            "errors": len(samples) - len(done),
            "prompt_tokens": sum(s.prompt_tokens for s in samples),
            "completion_tokens": sum(s.completion_tokens for s in samples),
            "ttft_us": quantiles(s.ttft for s in done if s.ttft is not None),
            "tpot_us": quantiles(s.tpot for s in done if s.tpot is not None),
            "itl_us": quantiles(itl[-ITL_SAMPLES:]),
            "e2e_us": quantiles(s.e2e for s in done),
            "queue_wait_us": quantiles(s.queue_wait for s in samples if s.queue_wait is not None),
        }

    def points(self, limit: int = POINTS) -> list[dict[str, Any]]:
        return [asdict(p) for p in list(self.timeline)[-limit:]]


async def sample_forever(recent: Recent, load: Callable[[], tuple[int, int]], interval: float = TICK_S) -> None:
    """Add a timeline point every ``interval`` seconds; ``load`` says (queue depth, in flight).
    Runs for the app's life; a failed tick is logged and the next one tried."""
    while True:
        await asyncio.sleep(interval)
        try:
            recent.tick(*load())
        except Exception:
            log.exception("the metrics timeline could not take a sample")
