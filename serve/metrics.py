"""Prometheus metrics of one replica (``GET /metrics``), in a registry of its own."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The content type of the Prometheus text format (``GET /metrics``)."""

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
_TTFT = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
_RATIO = tuple(i / 20 for i in range(1, 21))
_BATCH = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ffnskip_requests", "HTTP requests by endpoint and status (HTTP code, or "
                                "'cancelled' when the client left)", ["endpoint", "status"], registry=r)
        self.tokens = Counter("ffnskip_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("ffnskip_prompt_tokens", "Prompt tokens processed", registry=r)
        self.ttft = Histogram("ffnskip_time_to_first_token_seconds", "Request arrival to its first generated token",
                              buckets=_TTFT, registry=r)
        self.itl = Histogram("ffnskip_inter_token_latency_seconds", "Time between consecutive tokens of a request",
                             buckets=_LATENCY, registry=r)
        self.skip_ratio = Histogram("ffnskip_skip_ratio", "FFN skip ratio per completed request", buckets=_RATIO,
                                    registry=r)
        self.batch_size = Histogram("ffnskip_batch_size", "Sequences per decode batch", buckets=_BATCH, registry=r)
        self.running = Gauge("ffnskip_sequences_running", "Sequences in the decode batch now", registry=r)
        self.waiting = Gauge("ffnskip_requests_waiting", "Requests waiting for a batch", registry=r)
        self.policy_swaps = Counter("ffnskip_policy_swaps", "Policy swaps applied on this replica", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
