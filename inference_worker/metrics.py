"""The worker's Prometheus metrics, in a registry of the app's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class WorkerMetrics:
    """Counters and histograms for loads, receipts and generations."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.loads = Counter("worker_model_loads", "Model loads by result", ["result"], registry=r)
        self.load_seconds = Histogram("worker_model_load_seconds", "Seconds to load a model", registry=r)
        self.bytes_received = Counter("worker_model_bytes_received", "Model bytes written into the cache", registry=r)
        self.receives = Counter("worker_model_receives", "Model receipts by result", ["result"], registry=r)
        self.requests = Counter("worker_infer_requests", "Inference requests by result", ["result"], registry=r)
        self.tokens = Counter("worker_tokens_generated", "Tokens generated", registry=r)
        self.ttft_seconds = Histogram("worker_time_to_first_token_seconds", "Seconds to the first token",
                                      buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.loaded = Gauge("worker_model_loaded", "1 while a model is loaded", registry=r)
