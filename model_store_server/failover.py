"""Workers that stop answering: marked down, probed with backoff, reconciled when they answer again.

A worker is down from the first `worker_unavailable` until a probe reads it again; placement
skips it meanwhile. The probe is the same reconciliation a start-up does (`Upkeep.reconcile`):
a new boot id means the worker restarted (its memory is empty, its disk is adopted or
cleaned), the same boot id a network blip (what it holds is adopted as it is).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from model_store_server.background import BellThread
from model_swap.errors import ApiError

log = logging.getLogger(__name__)
FIRST_PROBE_S = 0.25


class WorkerHealth:
    """Whether one worker answers, and when to probe it next (the backoff doubles up to a bound)."""

    def __init__(self, max_backoff_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self._lock = threading.Lock()
        self._clock = clock
        self._max_backoff_s = max_backoff_s
        self._up = True
        self._backoff_s = FIRST_PROBE_S
        self._next_probe = 0.0
        self.downs = 0  # how often it went down, for /models and tests
        self.reason = ""

    @property
    def up(self) -> bool:
        return self._up

    def went_down(self, reason: str) -> bool:
        """Mark it down; True if it was up (the caller logs and publishes once)."""
        with self._lock:
            was_up, self._up = self._up, False
            self.reason = reason
            if was_up:
                self.downs += 1
                self._backoff_s = FIRST_PROBE_S
                self._next_probe = self._clock() + self._backoff_s
            return was_up

    def probe_failed(self) -> None:
        with self._lock:
            self._backoff_s = min(self._max_backoff_s, self._backoff_s * 2)
            self._next_probe = self._clock() + self._backoff_s

    def came_back(self) -> None:
        with self._lock:
            self._up, self.reason = True, ""

    def probe_due(self) -> float | None:
        """When to probe next (clock time), or None while it is up."""
        with self._lock:
            return None if self._up else self._next_probe

    def view(self) -> dict:
        with self._lock:
            return {"up": self._up, "downs": self.downs, "reason": self.reason or None,
                    "next_probe_in_s": None if self._up else round(max(0.0, self._next_probe - self._clock()), 3)}


class Prober(BellThread):
    """One thread that probes the workers that are down, each when its backoff says."""

    def __init__(self, slots: list, on_back: Callable[[object, tuple[list[str], list[str]]], None],
                 clock: Callable[[], float] = time.monotonic):
        super().__init__("prober")
        self._slots = slots
        self._on_back = on_back
        self._clock = clock

    def probe(self, slot) -> bool:
        """Read and reconcile one worker now; True if it answered."""
        try:
            found = slot.upkeep.reconcile()
        except ApiError as err:
            slot.health.probe_failed()
            log.info("[failover] worker %s still down: %s", slot.name, err.code)
            return False
        slot.health.came_back()
        self._on_back(slot, found)
        return True

    def _run(self) -> None:
        while not self.stopped:
            dues = [(due, slot) for slot in self._slots if (due := slot.health.probe_due()) is not None]
            if not dues:
                self._sleep(5.0)
                continue
            due, slot = min(dues, key=lambda d: d[0])
            wait = due - self._clock()
            if wait > 0:
                self._sleep(wait)
                continue
            self.probe(slot)
