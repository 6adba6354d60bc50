"""Prometheus metrics of the gateway (its own registry, so several apps can coexist in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gateway_requests",
            "Requests by endpoint, model and HTTP status",
            ["endpoint", "model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "gateway_request_duration_seconds",
            "Time from request to last byte",
            ["endpoint", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "Time from request to the first generated text",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.completion_tokens = self._per_model("gateway_completion_tokens", "Tokens generated")
        self.prompt_tokens = self._per_model("gateway_prompt_tokens", "Prompt tokens processed")
        # Admission (gateway.admission): engine requests running and requests waiting, per model.
        self.in_flight = Gauge(
            "gateway_in_flight", "Engine requests admitted and running", ["model"], registry=self.registry
        )
        self.queued = Gauge("gateway_queued", "Requests waiting for admission", ["model"], registry=self.registry)
        self.rejected = Counter(
            "gateway_rejected_requests",
            "Requests turned away: queue_full (429), queue_timeout and shutting_down (503)",
            ["model", "reason"],
            registry=self.registry,
        )

    def _per_model(self, name: str, documentation: str) -> Counter:
        return Counter(name, documentation, ["model"], registry=self.registry)
