"""Who may use a worker now: a gate per resident model, and one lane for changes.

A request for an *open* model (resident, not being unloaded) takes a use at once and streams;
it never waits for anything else. Every change to the worker (transfer, load, unload, delete,
reconciliation, sweeps, admin actions) holds the worker's one *lane*, granted in arrival order.
A request whose model is not open queues for the lane; while it waits, the model may open
(another request brought it in), and then it takes a use instead. The lane holder closes a
model before unloading it, and only once it has no uses (`try_close`): a busy model is never
cut off. `close` shuts a busy model's gate so that it drains (the bound on overtaking a swap).

All state sits under one condition variable; nothing else is ever locked while holding it.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import Counter, deque
from typing import Callable, Iterator

from model_swap.errors import ApiError

USE = "use"
LANE = "lane"


class QueueFull(ApiError):
    """Too many requests already wait for this model."""

    def __init__(self, model: str, limit: int, retry_after_s: int):
        super().__init__(429, "queue_full", f"{limit} requests already wait for {model}; retry later",
                         {"Retry-After": str(retry_after_s)})


class QueueTimeout(ApiError):
    """A request waited longer than QUEUE_TIMEOUT_S for its turn."""

    def __init__(self, model: str | None, waited_s: float):
        super().__init__(503, "queue_timeout", f"gave up after waiting {waited_s:.1f}s for "
                                               f"{model or 'the worker'}")


class WorkerGates:
    """Per-model use counts and open/closed gates, and the worker's change lane."""

    def __init__(self, max_queue: int = 64, clock: Callable[[], float] = time.monotonic):
        self._cond = threading.Condition()
        self._clock = clock
        self._max_queue = max_queue
        self.retry_after_s = 1  # what a 429 tells clients: about one change's time, set by the executor
        self._uses: Counter[str] = Counter()
        self._open: set[str] = set()
        self._closed: set[str] = set()  # resident, but new requests wait
        self._waiting: Counter[str] = Counter()
        self._lane: deque[object] = deque()
        self._holder: object | None = None
        self._version = 0  # bumped at every change, so waiters can tell something happened

    # ---- requests ----------------------------------------------------------------------

    def enter(self, model: str, deadline: float, may_use: bool = True) -> str:
        """USE when `model` is open (a use is taken), LANE when this caller holds the lane to bring it.

        may_use=False goes to the lane even if the model is open (its file changed in the store)."""
        with self._cond:
            if may_use and model in self._open:
                self._uses[model] += 1
                return USE
            if self._waiting[model] >= self._max_queue:
                raise QueueFull(model, self._max_queue, self.retry_after_s)
            self._waiting[model] += 1
            ticket = object()
            self._lane.append(ticket)
            started = self._clock()
            try:
                while True:
                    if may_use and model in self._open:
                        self._uses[model] += 1
                        return USE
                    if self._holder is None and self._lane[0] is ticket:
                        self._lane.popleft()
                        self._holder = ticket
                        return LANE
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        raise QueueTimeout(model, self._clock() - started)
                    self._cond.wait(remaining)
            finally:
                self._waiting[model] -= 1
                if not self._waiting[model]:
                    del self._waiting[model]
                if ticket in self._lane:
                    self._lane.remove(ticket)
                self._changed()

    def end_use(self, model: str) -> int:
        """A request's stream ended; return how many uses remain."""
        with self._cond:
            self._uses[model] -= 1
            left = self._uses[model]
            if left <= 0:
                del self._uses[model]
            self._changed()
            return max(0, left)

    # ---- the lane ----------------------------------------------------------------------

    @contextlib.contextmanager
    def lane(self, deadline: float = math.inf, what: str | None = None) -> Iterator[None]:
        """Hold the lane for a change that is not a request's (admin, sweeps, preloads)."""
        with self._cond:
            ticket = object()
            self._lane.append(ticket)
            started = self._clock()
            try:
                while not (self._holder is None and self._lane[0] is ticket):
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        raise QueueTimeout(what, self._clock() - started)
                    self._cond.wait(None if math.isinf(remaining) else remaining)
                self._lane.popleft()
                self._holder = ticket
            finally:
                if ticket in self._lane:
                    self._lane.remove(ticket)
                    self._changed()
        try:
            yield
        finally:
            self.leave_lane()

    def leave_lane(self) -> None:
        with self._cond:
            self._holder = None
            self._changed()

    # ---- the lane holder's tools ---------------------------------------------------------

    def open(self, model: str, use: bool = False) -> None:
        """`model` is resident and serves; with use=True the caller takes a use first."""
        with self._cond:
            self._closed.discard(model)
            self._open.add(model)
            if use:
                self._uses[model] += 1
            self._changed()

    def take_use(self, model: str) -> bool:
        """Take a use of an open model (the lane holder found it loaded); False if it is not open."""
        with self._cond:
            if model not in self._open:
                return False
            self._uses[model] += 1
            return True

    def try_close(self, models: tuple[str, ...] | list[str]) -> bool:
        """Close all of `models` if none has a use; else close none and return False."""
        with self._cond:
            if any(self._uses[m] for m in models):
                return False
            for m in models:
                self._open.discard(m)
                self._closed.add(m)
            self._changed()
            return True

    def close(self, models) -> set[str]:
        """Let no new request use `models` (they drain); return the ones this call closed."""
        with self._cond:
            closed = {m for m in models if m in self._open}
            self._open -= closed
            self._closed |= closed
            self._changed()
            return closed

    def reopen(self, models) -> None:
        """Open again the closed models among `models` (a change that closed them did not unload them)."""
        with self._cond:
            back = {m for m in models if m in self._closed}
            self._closed -= back
            self._open |= back
            self._changed()

    def forget(self, model: str) -> None:
        """`model` is no longer resident."""
        with self._cond:
            self._open.discard(model)
            self._closed.discard(model)
            self._changed()

    def sync(self, resident: list[str]) -> None:
        """Open exactly the resident models (the lane holder, after reading the worker, closes nothing)."""
        with self._cond:
            self._open = set(resident)
            self._closed.clear()
            self._changed()

    def wait_for_change(self, timeout: float | None) -> None:
        """Sleep until a use ends or a gate moves (or the timeout)."""
        with self._cond:
            version = self._version
            if timeout is None or timeout > 0:
                self._cond.wait_for(lambda: self._version != version, timeout)

    # ---- reading -----------------------------------------------------------------------

    def busy(self) -> frozenset[str]:
        """Models with uses now."""
        with self._cond:
            return frozenset(m for m, n in self._uses.items() if n > 0)

    def is_open(self, model: str) -> bool:
        with self._cond:
            return model in self._open

    def waiting(self, model: str) -> int:
        with self._cond:
            return self._waiting[model]

    def snapshot(self) -> dict:
        """For /models and tests."""
        with self._cond:
            return {"uses": dict(self._uses), "waiting": dict(self._waiting), "open": sorted(self._open),
                    "closed": sorted(self._closed), "lane_busy": self._holder is not None,
                    "lane_queue": len(self._lane)}

    def _changed(self) -> None:
        self._version += 1
        self._cond.notify_all()
