"""The store's Prometheus metrics, in a registry of the app's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class StoreMetrics:
    """Requests by action, evictions, bytes sent, transfer and load time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("store_user_requests", "User requests by cache action", ["action"], registry=r)
        self.evictions = Counter("store_evictions", "Models evicted from the worker's cache", registry=r)
        self.bytes_sent = Counter("store_bytes_sent", "Model bytes sent to the worker", ["transport"], registry=r)
        self.transfer_seconds = Histogram("store_transfer_seconds", "Seconds to send a model", ["transport"],
                                          registry=r)
        self.load_seconds = Histogram("store_worker_load_seconds", "Seconds for the worker to load a model",
                                      registry=r)
