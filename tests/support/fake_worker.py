"""FakeWorker: an in-process stand-in for the inference worker, as `WorkerClient` presents it.

A fast seam for the store's core, beside the real-service tests. It implements the API of the
worker that holds several models within a memory budget (`GET /models` with `loaded` objects,
`memory` and `boot_id`; loads alongside, 507 `insufficient_memory` when the count or the bytes
do not fit, changing nothing; `unload(model)` drains that model's generations, 409 `model_busy`
after the drain timeout, new generations meanwhile 409 `model_unloading`; `DELETE` unloads
first). Errors come out as `WorkerClient` raises them: 502 with the worker's code. It records
every change in `calls` and checks its own invariants (never over the budget or the count).
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator

import requests

from model_store_server.worker_client import LoadedModel, WorkerState, WorkerUnavailable
from model_swap.errors import ApiError

FAKE_BASE_RSS = 50 << 20  # what the fake says its process takes with nothing loaded


def worker_error(status: int, code: str, message: str = "", details: dict | None = None) -> ApiError:
    """What WorkerClient raises for a worker error answer (with the worker's figures as details)."""
    return ApiError(502, code, f"worker answered {status}: {message or code}", details=details)


@dataclass
class _Model:
    memory_bytes: int
    loaded_at: float
    last_used: float
    active: int = 0
    unloading: bool = False


@dataclass
class FakeStream:
    """One generation's answer; closing it ends the generation on the fake worker."""

    worker: "FakeWorker"
    model: str
    pieces: list[bytes]
    closed: bool = False
    headers: dict = field(default_factory=dict)  # the worker's response headers (none passed on here)
    _done: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.worker._end_generation(self.model)


class FakeWorker:
    """The worker's API in-process, with knobs for tests (delays, holds, failures, restarts)."""

    def __init__(self, max_loaded: int = 3, budget_bytes: int | None = None,
                 memory_of: Callable[[str, int], int] | None = None, drain_timeout_s: float = 5.0,
                 legacy: bool = False, n_parallel: int = 1):
        self.max_loaded = max_loaded
        self.budget_bytes = budget_bytes
        self.memory_of = memory_of or (lambda name, size: size)
        self.drain_timeout_s = drain_timeout_s
        self.legacy = legacy  # report "loaded" as one name, like the one-model worker
        self.n_parallel = n_parallel  # the slots its listing reports per model (it does not batch)
        self.boot_id = uuid.uuid4().hex
        self.disk: dict[str, tuple[int, str]] = {}
        self.disk_used: dict[str, float] = {}
        self.loaded: dict[str, _Model] = {}
        self.calls: list[str] = []
        self.generations: list[str] = []
        self.receives = 0
        self.push_seconds = 0.0
        self.load_seconds = 0.0
        self.up = True
        self.failures: dict[str, ApiError] = {}
        self.n_ctx = 2048
        self.sent: list[tuple[str, tuple[dict, ...] | None]] = []  # each generation's model and chat messages
        self._holds: dict[str, threading.Event] = {}
        self._push_hold: threading.Event | None = None
        self._breaks: set[str] = set()
        self._cond = threading.Condition()

    # ---- test controls ---------------------------------------------------------------------

    def hold(self, model: str) -> None:
        """Generations of `model` give their first piece, then wait for release(model)."""
        with self._cond:
            self._holds[model] = threading.Event()

    def release(self, model: str) -> None:
        with self._cond:
            event = self._holds.pop(model, None)
        if event:
            event.set()

    def hold_pushes(self) -> None:
        """Pushes report their first progress, then wait for release_pushes()."""
        with self._cond:
            self._push_hold = threading.Event()

    def release_pushes(self) -> None:
        with self._cond:
            event, self._push_hold = self._push_hold, None
        if event:
            event.set()

    def break_streams(self, model: str) -> None:
        """Streams of `model` break off after their first piece, as when the worker dies mid-answer."""
        with self._cond:
            self._breaks.add(model)

    def fail_next(self, op: str, err: ApiError) -> None:
        """Make the next call of `op` (load, push, delete, unload, infer, state) raise `err`."""
        self.failures[op] = err

    def restart(self) -> None:
        """A new process: new boot id, nothing in memory, the disk as it was."""
        with self._cond:
            self.boot_id = uuid.uuid4().hex
            self.loaded.clear()
            self.calls.append("restart")

    def active(self, model: str) -> int:
        with self._cond:
            m = self.loaded.get(model)
            return m.active if m else 0

    def changes(self) -> list[str]:
        """The calls that changed the worker, in order."""
        return [c for c in self.calls if not c.startswith("infer")]

    def _check(self, op: str) -> None:
        if not self.up:
            raise WorkerUnavailable("worker at fake unreachable: ConnectionError")
        err = self.failures.pop(op, None)
        if err is not None:
            raise err

    def _used(self) -> int:
        return sum(m.memory_bytes for m in self.loaded.values())

    # ---- the API, as WorkerClient offers it -------------------------------------------------

    def state(self) -> WorkerState:
        with self._cond:
            self._check("state")
            cached = [{"name": n, "size": s, "sha256": h, "last_used": self.disk_used.get(n, 0.0)}
                      for n, (s, h) in sorted(self.disk.items(), key=lambda kv: self.disk_used.get(kv[0], 0.0))]
            if self.legacy:
                name = next(iter(self.loaded), None)
                return WorkerState((LoadedModel(name),) if name else (), cached)
            loaded = tuple(LoadedModel(n, m.memory_bytes, m.memory_bytes, m.active, 0, None, self.n_parallel)
                           for n, m in self.loaded.items())
            return WorkerState(loaded, cached, self.budget_bytes, self._used(), self.max_loaded, self.boot_id)

    def memory(self) -> dict:
        """GET /memory with made-up figures (a fake has no process to measure): RSS grows with what is loaded."""
        with self._cond:
            self._check("memory")
            self.calls.append("memory")
            return {"rss_bytes": FAKE_BASE_RSS + self._used(), "host_available_bytes": None, "gpu": None,
                    "loaded": list(self.loaded), "used_bytes": self._used(), "budget_bytes": self.budget_bytes,
                    "max_loaded_models": self.max_loaded}

    def push(self, name: str, path, size: int, sha256: str, progress=None) -> float:
        started = time.perf_counter()
        self._check("push")
        steps = 10
        for i in range(1, steps + 1):
            if self.push_seconds:
                time.sleep(self.push_seconds / steps)
            if progress:
                progress(size * i // steps)
            with self._cond:
                hold = self._push_hold
            if hold is not None:
                hold.wait(60)
        with self._cond:
            self.disk[name] = (size, sha256)
            self.disk_used[name] = time.monotonic()
            self.receives += 1
            self.calls.append(f"push {name}")
        return time.perf_counter() - started

    def load_local(self, name: str) -> dict:
        if self.load_seconds:
            time.sleep(self.load_seconds)
        with self._cond:
            self._check("load")
            if name not in self.disk:
                raise worker_error(404, "model_not_cached", f"{name} is not in the worker's cache")
            if name in self.loaded:
                return {"loaded": name, "load_ms": 0.0}
            need = self.memory_of(name, self.disk[name][0])
            if len(self.loaded) + 1 > self.max_loaded or (
                    self.budget_bytes is not None and self._used() + need > self.budget_bytes):
                if self.legacy:  # the one-model worker swaps by itself
                    self.loaded.clear()
                else:
                    self.calls.append(f"refuse {name}")
                    raise worker_error(507, "insufficient_memory", f"{name} needs {need} bytes, {self._free()} free",
                                       {"need_bytes": need, "free_bytes": self._free()})
            now = time.monotonic()
            self.loaded[name] = _Model(need, now, now)
            self.disk_used[name] = now
            self.calls.append(f"load {name}")
            assert len(self.loaded) <= self.max_loaded or self.legacy
            assert self.budget_bytes is None or self._used() <= self.budget_bytes
            return {"loaded": name, "load_ms": 1.0}

    def _free(self) -> int | None:
        return None if self.budget_bytes is None else self.budget_bytes - self._used()

    def unload(self, name: str | None = None) -> None:
        with self._cond:
            self._check("unload")
            names = list(self.loaded) if (name is None or self.legacy) else [name]
            for n in names:
                self._drain_and_unload(n)

    def _drain_and_unload(self, name: str) -> None:
        model = self.loaded.get(name)
        if model is None:
            return
        model.unloading = True
        if not self._cond.wait_for(lambda: model.active == 0, self.drain_timeout_s):
            model.unloading = False
            raise worker_error(409, "model_busy", f"{name} still has generations running")
        del self.loaded[name]
        self.calls.append(f"unload {name}")

    def delete(self, name: str) -> bool:
        with self._cond:
            self._check("delete")
            self._drain_and_unload(name)
            if name not in self.disk:
                return False
            del self.disk[name]
            self.calls.append(f"delete {name}")
            return True

    def infer(self, model: str, request, stream_format: str = "text") -> FakeStream:
        with self._cond:
            self._check("infer")
            m = self.loaded.get(model)
            if m is None:
                raise worker_error(409, "model_not_loaded", f"{model} is not loaded")
            if m.unloading:
                raise worker_error(409, "model_unloading", f"{model} is being unloaded")
            m.active += 1
            m.last_used = time.monotonic()
            self.generations.append(model)
            self.sent.append((model, request.messages))
            self.calls.append(f"infer {model}")
        if stream_format == "ndjson":
            pieces = [b'{"text": "fake "}\n', b'{"text": "text"}\n',
                      b'{"finish_reason": "length", "completion_tokens": 2, "prompt_tokens": 1}\n']
        else:
            pieces = [f"[{model}]".encode(), b" fake text"]
        return FakeStream(self, model, pieces)

    def tokenize(self, model: str, messages: list[dict]) -> tuple[int, int]:
        """(tokens, n_ctx) with a stand-in count (no tokenizer here): one token per message and per 4 bytes."""
        with self._cond:
            self._check("tokenize")
            if model not in self.loaded:
                raise worker_error(409, "model_not_loaded", f"{model} is not loaded")
            self.calls.append(f"tokenize {model}")
        return sum(1 + len(m["content"].encode()) // 4 for m in messages), self.n_ctx

    def iter_text(self, upstream: FakeStream) -> Iterator[bytes]:
        try:
            for i, piece in enumerate(upstream.pieces):
                if i == 1 and upstream.model in self._breaks:
                    raise requests.ConnectionError("fake worker: connection reset mid-stream")
                if i == 1:
                    with self._cond:
                        hold = self._holds.get(upstream.model)
                    if hold is not None:
                        hold.wait(30)
                yield piece
        finally:
            upstream.close()

    def _end_generation(self, model: str) -> None:
        with self._cond:
            m = self.loaded.get(model)
            if m is not None:
                m.active -= 1
                m.last_used = time.monotonic()
            self._cond.notify_all()
