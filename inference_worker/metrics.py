"""The worker's Prometheus metrics, in a registry of the app's own."""

from __future__ import annotations

import threading
import time
from collections import deque

from inference_worker.batch_stream import StepInfo
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

TOKEN_RATE_WINDOW_S = 10.0


class WorkerMetrics:
    """Counters and histograms for loads, receipts and generations; gauges of what is resident."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes: the RSS the budget is about
        self.loads = Counter("worker_model_loads", "Model loads by result", ["result"], registry=r)
        self.load_seconds = Histogram("worker_model_load_seconds", "Seconds to load a model", registry=r)
        self.bytes_received = Counter("worker_model_bytes_received", "Model bytes written into the cache", registry=r)
        self.receives = Counter("worker_model_receives", "Model receipts by result", ["result"], registry=r)
        self.requests = Counter("worker_infer_requests", "Inference requests by result", ["result"], registry=r)
        self.tokens = Counter("worker_tokens_generated", "Tokens generated", registry=r)
        self.ttft_seconds = Histogram("worker_time_to_first_token_seconds", "Seconds to the first token",
                                      buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.loaded = Gauge("worker_model_loaded", "1 for each resident model", ["model"], registry=r)
        self.model_memory = Gauge("worker_model_memory_bytes", "A resident model's memory, measured (RSS change "
                                  "across its load) and estimated (from its GGUF header)", ["model", "kind"],
                                  registry=r)
        self.generations = Gauge("worker_model_generations", "Generations per resident model, running or waiting",
                                 ["model", "state"], registry=r)
        self.memory_used = Gauge("worker_memory_used_bytes", "Bytes the resident models count against the budget",
                                 registry=r)
        self.memory_budget = Gauge("worker_memory_budget_bytes", "Bytes resident models may take", registry=r)
        self.slots = Gauge("worker_batch_slots", "A batched model's slots: in use, free, and requests queued for one",
                           ["model", "state"], registry=r)
        self.batch_size = Histogram("worker_batch_step_sequences", "Streams decoded together per llama_decode step",
                                    ["model"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.batch_tokens = Counter("worker_batch_tokens_generated", "Tokens sampled by a batched model's decode loop",
                                    ["model"], registry=r)
        self.tokens_per_second = Gauge("worker_batch_tokens_per_second", "Tokens a batched model sampled per second "
                                       f"over the last {TOKEN_RATE_WINDOW_S:g} s", ["model"], registry=r)
        self._recent: dict[str, deque] = {}  # model -> (time, tokens) per step within the window
        self._recent_lock = threading.Lock()
        self._scrape_lock = threading.Lock()  # one scrape at a time: each clears and refills the gauges

    def observe_step(self, model: str, step: StepInfo) -> None:
        """One decode step of a batched model (called on its decode thread: cheap)."""
        self.batch_size.labels(model).observe(step.sequences)
        self.batch_tokens.labels(model).inc(step.generated)
        now = time.monotonic()
        with self._recent_lock:
            recent = self._recent.setdefault(model, deque())
            recent.append((now, step.generated))
            while recent and recent[0][0] < now - TOKEN_RATE_WINDOW_S:
                recent.popleft()

    def _token_rate(self, model: str) -> float:
        now = time.monotonic()
        with self._recent_lock:
            recent = self._recent.get(model, ())
            return sum(n for t, n in recent if t >= now - TOKEN_RATE_WINDOW_S) / TOKEN_RATE_WINDOW_S

    def exposition(self, models: list[dict], memory: dict) -> bytes:
        """The text format, with the residency gauges set from the registry's snapshot."""
        with self._scrape_lock:
            self._refresh_residency(models, memory)
            return generate_latest(self.registry)

    def _refresh_residency(self, models: list[dict], memory: dict) -> None:
        for gauge in (self.loaded, self.model_memory, self.generations, self.slots, self.tokens_per_second):
            gauge.clear()  # unloaded models drop out
        for m in models:
            self.loaded.labels(m["name"]).set(1)
            self.model_memory.labels(m["name"], "measured").set(m["memory_bytes"])
            self.model_memory.labels(m["name"], "estimated").set(m["estimated_bytes"])
            self.generations.labels(m["name"], "active").set(m["active"])
            self.generations.labels(m["name"], "waiting").set(m["waiting"])
            if "slots" in m:
                self.slots.labels(m["name"], "active").set(m["slots"]["active"])
                self.slots.labels(m["name"], "free").set(m["n_parallel"] - m["slots"]["active"])
                self.slots.labels(m["name"], "queued").set(m["slots"]["queued"])
                self.tokens_per_second.labels(m["name"]).set(self._token_rate(m["name"]))
        with self._recent_lock:  # forget unloaded models' steps
            for name in set(self._recent) - {m["name"] for m in models}:
                del self._recent[name]
        self.memory_used.set(memory["used_bytes"])
        self.memory_budget.set(memory["budget_bytes"])
