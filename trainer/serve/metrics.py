"""Prometheus metrics of `kubetune serve` (scraped at `/metrics`).

Names an HPA (through the Prometheus adapter) scales on:
- `kubetune_requests_in_flight`: HTTP generation requests being handled (queued or running);
- `kubetune_queue_depth`: sequences waiting for a batch slot;
- `kubetune_requests_running`: sequences in the running batch (continuous batching).
Each app gets its own registry, so several servers (tests) in one process do not collide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class ServerMetrics:
    registry: Any = field(default=None)

    def __post_init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = self.registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("kubetune_requests", "Generation requests by model, endpoint and HTTP status.",
                                ["model", "endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("kubetune_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.generation_tokens = Counter("kubetune_generation_tokens", "Tokens generated.", ["model"], registry=r)
        self.latency = Histogram("kubetune_request_duration_seconds", "End-to-end request latency.", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("kubetune_time_to_first_token_seconds", "Time to the first streamed token.", ["endpoint"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("kubetune_requests_in_flight", "Generation requests being handled (queued or running).",
                               registry=r)
        self.queue_depth = Gauge("kubetune_queue_depth", "Sequences waiting for a batch slot.", registry=r)
        self.running = Gauge("kubetune_requests_running", "Sequences in the batch being decoded.", registry=r)
        self.batch_size = Histogram("kubetune_batch_size", "Sequences in the batch per decode step.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.cancelled = Counter("kubetune_sequences_cancelled", "Sequences stopped early because their client went away.",
                                 registry=r)
        self.ready = Gauge("kubetune_model_ready", "1 when the model is loaded and the server takes requests.", registry=r)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
