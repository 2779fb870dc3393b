"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("ling_requests", "HTTP requests to /v1 routes", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("ling_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("ling_generation_tokens", "tokens generated", registry=r)
        self.finished = Counter("ling_sequences_finished", "sequences that left the batch, by finish reason",
                                ["reason"], registry=r)
        self.queue_depth = Gauge("ling_queue_depth", "sequences waiting for a batch row", registry=r)
        self.running = Gauge("ling_running_sequences", "sequences in the running batch", registry=r)
        self.batch_size = Histogram("ling_batch_size", "rows per decode step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.time_to_first_token = Histogram("ling_time_to_first_token_seconds", "submission to first token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("ling_time_per_output_token_seconds", "gap between tokens",
                                               buckets=TOKEN_BUCKETS, registry=r)
        self.request_latency = Histogram("ling_request_latency_seconds", "request start to last byte",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
