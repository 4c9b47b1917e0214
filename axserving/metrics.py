"""Prometheus metrics, declared once with fixed label sets; the registry is injectable for tests."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from axserving.models.manager import ModelManager, ModelState
from axserving.scheduler import Scheduler

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "axs_requests", "Finished inference requests", ["model", "endpoint", "status"], registry=r
        )
        self.finish = Counter(
            "axs_request_finish", "Finished generations by finish reason", ["model", "reason"], registry=r
        )
        self.prompt_tokens = Counter("axs_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.cached_prompt_tokens = Counter(
            "axs_prompt_tokens_cached", "Prompt tokens reused from the KV cache (prefix hits)", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "axs_generation_tokens", "Tokens generated", ["model"], registry=r
        )
        self.ttft = Histogram(
            "axs_time_to_first_token_seconds", "Time to first token", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "axs_e2e_request_latency_seconds", "End-to-end request latency", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "axs_queue_wait_seconds", "Time from arrival to submission to the engine", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.running = Gauge("axs_requests_running", "Requests in flight", ["model"], registry=r)
        self.engine_restarts = Counter(
            "axs_engine_restarts", "Engine process restarts", ["model"], registry=r
        )


class ModelsCollector(Collector):
    """The models and their engines, read from the manager at each scrape: a model that was
    unloaded leaves no stale series behind."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        m = self.manager
        yield GaugeMetricFamily("axs_loaded_models", "Models loaded (any state)", value=len(m))
        yield GaugeMetricFamily(
            "axs_models_memory_bytes", "Estimated memory of the loaded models' engines", value=m.memory_used
        )
        yield GaugeMetricFamily("axs_models_memory_budget_bytes", "The models' memory budget", value=m.memory_budget)
        evictions = CounterMetricFamily("axs_model_evictions", "Models evicted, by reason", labels=["reason"])
        for reason, n in m.evictions.items():
            evictions.add_metric([reason.value], n)
        yield evictions
        up = GaugeMetricFamily("axs_engine_up", "1 while the model's engine is ready", labels=["model"])
        running = GaugeMetricFamily(
            "axs_engine_running_sequences", "Sequences the engine is generating", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            "axs_engine_waiting_sequences", "Sequences accepted by the engine, not started", labels=["model"]
        )
        preempted = GaugeMetricFamily(
            "axs_engine_preemptions",
            "Sequences preempted because the KV cache was full (recomputed later), since the engine started",
            labels=["model"],
        )
        for model in m:
            snap = model.engine.client.snapshot()
            up.add_metric([model.id], 1 if model.state is ModelState.ready else 0)
            running.add_metric([model.id], snap.get("running", 0))
            waiting.add_metric([model.id], snap.get("waiting", 0))
            preempted.add_metric([model.id], snap.get("preemptions", 0))
        yield from (up, running, waiting, preempted)


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
        running = GaugeMetricFamily("axs_num_requests_running", "Requests running, by model", labels=["model"])
        waiting = GaugeMetricFamily("axs_num_requests_waiting", "Requests waiting, by model", labels=["model"])
        models = set(s.per_model) | {w.model for w in s.waiting}
        for model in sorted(models):
            running.add_metric([model], s.per_model.get(model, 0))
            waiting.add_metric([model], s.queued(model))
        yield running
        yield waiting
