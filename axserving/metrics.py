"""Prometheus metrics, declared once with fixed label sets; the registry is injectable for tests."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        self.engine_up = Gauge("axs_engine_up", "1 while the model's engine is ready", ["model"], registry=r)
        self.engine_running = Gauge(
            "axs_engine_running_sequences", "Sequences the engine is generating", ["model"], registry=r
        )
        self.engine_waiting = Gauge(
            "axs_engine_waiting_sequences", "Sequences accepted by the engine, not started", ["model"], registry=r
        )
        self.engine_preemptions = Gauge(
            "axs_engine_preemptions",
            "Sequences preempted because the KV cache was full (recomputed later), since the engine started",
            ["model"],
            registry=r,
        )
        self.loaded_models = Gauge("axs_loaded_models", "Models loaded (any state)", registry=r)
        self.memory_used = Gauge(
            "axs_models_memory_bytes", "Estimated memory of the loaded models' engines", registry=r
        )
        self.memory_budget = Gauge("axs_models_memory_budget_bytes", "The models' memory budget", registry=r)
        self.evictions = Gauge(
            "axs_model_evictions", "Models evicted since start, by reason", ["reason"], registry=r
        )
        self.engine_restarts = Counter(
            "axs_engine_restarts", "Engine process restarts", ["model"], registry=r
        )
