"""The store's Prometheus metrics, in a registry of the app's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class StoreMetrics:
    """Requests by action, evictions, unloads, refusals, bytes sent, transfer and load time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("store_user_requests", "User requests by cache action", ["action"], registry=r)
        self.evictions = Counter("store_evictions", "Models evicted from the worker's cache", registry=r)
        self.unloads = Counter("store_unloads", "Models unloaded from the worker's memory, by reason",
                               ["reason"], registry=r)
        self.rejections = Counter("store_rejections", "Requests refused, by error code", ["code"], registry=r)
        self.bytes_sent = Counter("store_bytes_sent", "Model bytes sent to the worker", ["transport"], registry=r)
        self.transfer_seconds = Histogram("store_transfer_seconds", "Seconds to send a model", ["transport"],
                                          registry=r)
        self.load_seconds = Histogram("store_worker_load_seconds", "Seconds for the worker to load a model",
                                      registry=r)
        self.queue_seconds = Histogram("store_queue_seconds", "Seconds a request waited for its model",
                                       registry=r, buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60,
                                                            300))
        self.worker_up = Gauge("store_worker_up", "1 while placement uses the worker, 0 while it is down",
                               ["worker"], registry=r)
        self.worker_requests = Counter("store_worker_requests", "User requests by worker and cache action",
                                       ["worker", "action"], registry=r)
        self.worker_resident = Gauge("store_worker_resident_models", "Models the store believes resident, by worker",
                                     ["worker"], registry=r)
        self.worker_cached = Gauge("store_worker_cached_models", "Files the store believes on disk, by worker",
                                   ["worker"], registry=r)
