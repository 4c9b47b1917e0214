"""Prometheus metrics, declared once with fixed label sets; the registry is injectable for tests.

Names follow vLLM's (``vllm:time_to_first_token_seconds`` is ``axs_time_to_first_token_seconds``)
and AX Serving's where they have one. Label values never come from a request: ``model`` is a
loaded model's id, ``endpoint`` a route's path template (``unmatched`` for any other path),
``status`` an HTTP status, ``reason`` one of a fixed set.

Per request, :class:`RequestMetrics` observes the histograms once, when the request ends; tokens
are counted as they stream, so rates are current while long streams run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from axserving.models.manager import ModelManager, ModelState
from axserving.recent import Recent, RequestSample
from axserving.scheduler import Scheduler

# Seconds: from a cached prompt's few milliseconds to a long generation's minutes.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)
# Seconds per token: a small model on a CPU decodes in ~5-20 ms, a large one in 100s of ms.
TOKEN_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
)
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.recent = Recent()
        self.requests = Counter(
            "axs_requests", "HTTP responses of every route (auth failures, 404s and the front's own errors too), "
            "by model (inference routes; empty elsewhere), endpoint (route template) and status",
            ["model", "endpoint", "status"], registry=r,
        )
        self.finish = Counter(
            "axs_request_finish", "Finished generations (each choice) by finish reason", ["model", "reason"], registry=r
        )
        self.prompt_tokens = Counter("axs_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.cached_prompt_tokens = Counter(
            "axs_prompt_tokens_cached", "Prompt tokens reused from the KV cache (prefix hits)", ["model"], registry=r
        )
        self.generation_tokens = Counter("axs_generation_tokens", "Tokens generated", ["model"], registry=r)

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ["model"], buckets=buckets, registry=r)

        self.ttft = hist("axs_time_to_first_token_seconds", "Arrival to the first generated token", LATENCY_BUCKETS)
        self.itl = hist(
            "axs_inter_token_latency_seconds", "Time between successive output tokens of a choice", TOKEN_LATENCY_BUCKETS
        )
        self.tpot = hist(
            "axs_time_per_output_token_seconds",
            "A request's decode time over its output tokens after the first (requests of two or more tokens)",
            TOKEN_LATENCY_BUCKETS,
        )
        self.e2e = hist("axs_e2e_request_latency_seconds", "Arrival to the response's end", LATENCY_BUCKETS)
        self.queue = hist(
            "axs_request_queue_time_seconds", "Arrival to submission to the engine (waiting for a slot)", LATENCY_BUCKETS
        )
        self.prefill = hist(
            "axs_request_prefill_time_seconds", "Submission to the engine to the first token (waiting in the engine "
            "and computing the prompt)", LATENCY_BUCKETS,
        )
        self.decode = hist(
            "axs_request_decode_time_seconds", "First token to last token", LATENCY_BUCKETS
        )
        self.prompt_len = hist("axs_request_prompt_tokens", "Prompt tokens per request", TOKEN_COUNT_BUCKETS)
        self.generation_len = hist(
            "axs_request_generation_tokens", "Generated tokens per request (all choices)", TOKEN_COUNT_BUCKETS
        )
        self.running = Gauge("axs_requests_running", "Requests in flight in the front, by model", ["model"], registry=r)
        self.engine_restarts = Counter("axs_engine_restarts", "Engine process restarts", ["model"], registry=r)

    def for_request(self, model: str, arrived: float) -> RequestMetrics:
        return RequestMetrics(self, model, arrived)


class RequestMetrics:
    """One request's figures: its token counters as they stream, its histograms at the end.
    Per token it costs a clock read, a counter increment and a list append."""

    __slots__ = (
        "_gen", "_itl", "_last_at", "_m", "arrived", "cached_tokens", "completion", "first_token_at", "model",
        "prompt_tokens", "queue_wait", "submitted",
    )

    def __init__(self, metrics: Metrics, model: str, arrived: float) -> None:
        self._m = metrics
        self.model = model
        self.arrived = arrived
        self.queue_wait: float | None = None
        self.submitted: float | None = None
        self.first_token_at: float | None = None
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion: dict[int, int] = {}  # per choice
        self._last_at: dict[int, float] = {}
        self._itl: list[float] = []
        self._gen = metrics.generation_tokens.labels(model)

    @property
    def completion_tokens(self) -> int:
        return sum(self.completion.values())

    def admitted(self, queue_wait: float) -> None:
        self.queue_wait = queue_wait

    def output(self, index: int, completion_tokens: int, now: float) -> None:
        """A choice's running total of output tokens went to ``completion_tokens`` at ``now``."""
        new = completion_tokens - self.completion.get(index, 0)
        if new <= 0:
            return
        self.completion[index] = completion_tokens
        self._gen.inc(new)
        self._m.recent.generated += new
        last = self._last_at.get(index)
        if last is not None:
            gap = (now - last) / new  # tokens that came together share the wait
            if new == 1:
                self._itl.append(gap)
            else:
                self._itl.extend([gap] * new)
        self._last_at[index] = now

    def finish(self, status: int, finishes: list[str]) -> None:
        m, model = self._m, self.model
        now = time.monotonic()
        e2e = now - self.arrived
        m.e2e.labels(model).observe(e2e)
        if self.queue_wait is not None:
            m.queue.labels(model).observe(self.queue_wait)
        ttft = tpot = None
        if self.first_token_at is not None:
            ttft = self.first_token_at - self.arrived
            m.ttft.labels(model).observe(ttft)
            if self.submitted is not None:
                m.prefill.labels(model).observe(max(0.0, self.first_token_at - self.submitted))
            last = max(self._last_at.values(), default=self.first_token_at)
            decode = max(0.0, last - self.first_token_at)
            m.decode.labels(model).observe(decode)
            generated = self.completion_tokens
            if generated > 1:
                tpot = decode / (generated - len(self.completion))  # each choice's first token excluded
                m.tpot.labels(model).observe(tpot)
        if self._itl:
            itl = m.itl.labels(model)
            for gap in self._itl:
                itl.observe(gap)
        if self.submitted is not None:
            m.prompt_len.labels(model).observe(self.prompt_tokens)
            m.generation_len.labels(model).observe(self.completion_tokens)
        m.prompt_tokens.labels(model).inc(self.prompt_tokens)
        m.cached_prompt_tokens.labels(model).inc(self.cached_tokens)
        for reason in finishes:
            m.finish.labels(model, reason).inc()
        m.recent.add(RequestSample(
            time.time(), model, status, e2e, self.queue_wait, ttft, tpot, self.prompt_tokens, self.completion_tokens,
        ), self._itl)


@dataclass(frozen=True, slots=True)
class EngineFigures:
    """What the metrics say of one model's engine, read from its client's snapshot."""

    running: int
    waiting: int
    max_batch: int
    kv_usage: float
    rss_bytes: int
    preemptions: int
    prefill_tokens: int
    drafted_tokens: int
    kept_tokens: int

    @classmethod
    def of(cls, snap: dict[str, object]) -> EngineFigures:
        def num(key: str) -> int:
            value = snap.get(key) or 0
            return int(value) if isinstance(value, int | float) else 0

        kv = snap.get("kv_usage") or 0.0
        return cls(
            num("running"), num("waiting"), max(1, num("max_batch")), float(kv) if isinstance(kv, int | float) else 0.0,
            num("rss_bytes"), num("preemptions_total"), num("prefill_tokens_total"),
            num("drafted_tokens_total"), num("kept_tokens_total"),
        )

    @property
    def batch_occupancy(self) -> float:
        return min(1.0, self.running / self.max_batch)


def front_rss() -> int:
    return int(psutil.Process().memory_info().rss)


class ModelsCollector(Collector):
    """The models and their engines, read from the manager at each scrape: a model that was
    unloaded leaves no stale series behind."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        m = self.manager
        yield GaugeMetricFamily("axs_loaded_models", "Models loaded (any state)", value=len(m))
        by_state = GaugeMetricFamily("axs_loaded_models_by_state", "Models loaded, by state", labels=["state"])
        counts = {s: 0 for s in ModelState}
        for model in m:
            counts[model.state] += 1
        for state, n in counts.items():
            by_state.add_metric([state.value], n)
        yield by_state
        yield GaugeMetricFamily(
            "axs_models_memory_bytes", "Estimated memory of the loaded models' engines", value=m.memory_used
        )
        yield GaugeMetricFamily("axs_models_memory_budget_bytes", "The models' memory budget", value=m.memory_budget)
        evictions = CounterMetricFamily("axs_model_evictions", "Models evicted, by reason", labels=["reason"])
        for reason, n in m.evictions.items():
            evictions.add_metric([reason.value], n)
        yield evictions
        yield GaugeMetricFamily("axs_rss_bytes", "Resident memory of the front process", value=front_rss())

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["model"])

        up = gauge("axs_engine_up", "1 while the model's engine is ready")
        running = gauge("axs_engine_running_sequences", "Sequences the engine is generating")
        waiting = gauge("axs_engine_waiting_sequences", "Sequences accepted by the engine, not started")
        occupancy = gauge("axs_batch_occupancy", "Running sequences over the engine's max_batch (0..1)")
        kv = gauge("axs_kv_cache_usage_perc", "Fraction of the engine's KV cache held by running sequences (0..1)")
        rss = gauge("axs_engine_rss_bytes", "Resident memory of the model's engine process")
        preempted = CounterMetricFamily(
            "axs_num_preemptions", "Sequences preempted because the KV cache was full (recomputed later)",
            labels=["model"],
        )
        prefill = CounterMetricFamily(
            "axs_engine_prefill_tokens", "Prompt tokens the engine computed (reused ones are not)", labels=["model"]
        )
        drafted = CounterMetricFamily(
            "axs_spec_decode_draft_tokens", "Tokens drafted by prompt lookup and verified (draft_tokens)", labels=["model"]
        )
        kept = CounterMetricFamily(
            "axs_spec_decode_accepted_tokens", "Drafted tokens kept: drawn as drafted", labels=["model"]
        )
        for model in m:
            e = EngineFigures.of(model.engine.client.snapshot())
            up.add_metric([model.id], 1 if model.state is ModelState.ready else 0)
            running.add_metric([model.id], e.running)
            waiting.add_metric([model.id], e.waiting)
            occupancy.add_metric([model.id], e.batch_occupancy)
            kv.add_metric([model.id], e.kv_usage)
            rss.add_metric([model.id], e.rss_bytes)
            preempted.add_metric([model.id], e.preemptions)
            prefill.add_metric([model.id], e.prefill_tokens)
            drafted.add_metric([model.id], e.drafted_tokens)
            kept.add_metric([model.id], e.kept_tokens)
        yield from (up, running, waiting, occupancy, kv, rss, preempted, prefill, drafted, kept)


class SchedulerCollector(Collector):
    """The front's admission state, read at each scrape (names as AX Serving's, and the two
    gauges routers read to place requests, as vLLM's ``num_requests_running/waiting``)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[Metric]:
        s = self.scheduler
        yield GaugeMetricFamily("axs_scheduler_inflight_count", "Requests holding a slot", value=s.inflight)
        yield GaugeMetricFamily("axs_scheduler_queue_depth", "Requests waiting for a slot", value=len(s.waiting))
        yield GaugeMetricFamily("axs_scheduler_limit", "The running limit (AIMD moves it)", value=s.limit)
        yield CounterMetricFamily("axs_scheduler_rejected_requests", "Requests refused with a 429", value=s.rejected)
        yield CounterMetricFamily("axs_scheduler_shed_requests", "Waiters shed for newer requests (503)", value=s.shed)
        yield CounterMetricFamily(
            "axs_scheduler_queue_timeouts", "Waiters whose max_wait_ms ran out (503)", value=s.timed_out
        )
        rejections = CounterMetricFamily(
            "axs_request_rejections", "Requests the scheduler turned away, by reason", labels=["reason"]
        )
        for reason, n in (("queue_full", s.rejected), ("shed", s.shed), ("queue_timeout", s.timed_out)):
            rejections.add_metric([reason], n)
        yield rejections
        running = GaugeMetricFamily("axs_num_requests_running", "Requests running, by model", labels=["model"])
        waiting = GaugeMetricFamily("axs_num_requests_waiting", "Requests waiting, by model", labels=["model"])
        models = set(s.per_model) | {w.model for w in s.waiting}
        for model in sorted(models):
            running.add_metric([model], s.per_model.get(model, 0))
            waiting.add_metric([model], s.queued(model))
        yield running
        yield waiting
