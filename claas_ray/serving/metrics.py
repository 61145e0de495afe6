"""Prometheus metrics of the HTTP surface, per endpoint and per model (adapter)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class ServingMetrics:
    """One registry per router replica, so re-creating the app never double-registers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "claas_requests", "HTTP requests", ["endpoint", "model", "status"], registry=self.registry
        )
        self.tokens = Counter("claas_tokens", "Tokens processed", ["model", "kind"], registry=self.registry)
        self.latency = Histogram(
            "claas_request_latency_seconds", "End-to-end request latency", ["endpoint", "model"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.first_token = Histogram(
            "claas_time_to_first_token_seconds", "Time to the first generated token", ["model"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )

    def observe(self, endpoint: str, model: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, model, str(status)).inc()
        self.latency.labels(endpoint, model).observe(seconds)

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        self.tokens.labels(model, "prompt").inc(prompt)
        self.tokens.labels(model, "completion").inc(completion)

    def render(self) -> bytes:
        return generate_latest(self.registry)
