"""An explicit switch: make one model resident now and report the worker's memory around it.

The switch is a change like any other: it holds the worker's lane, and the executor's memory
plan decides what must go, waiting for busy models to drain (a running generation completes)
exactly as a request's swap does. What it adds is four readings of the worker's `GET /memory`:
before anything is unloaded, right after the unloads, after a settle wait (memory returned to
the OS or the GPU driver takes a moment; Ollama waits too before it loads), and after the load.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from model_store_server.catalog import StoredModel
from model_store_server.outcome import Outcome
from model_store_server.upkeep import Upkeep
from model_swap.errors import ApiError

log = logging.getLogger(__name__)
SNAPSHOTS = ("before_unload", "after_unload", "after_settle", "after_load")


@dataclass
class SwitchReport:
    """What a switch did and what memory looked like at each step."""

    model: str
    outcome: Outcome
    settle_s: float = 0.0  # the settle waits made (none when nothing was unloaded)
    elapsed_ms: float = 0.0
    snapshots: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        o = self.outcome
        return {"model": self.model, "action": o.action, "unloaded": o.unloaded, "evicted": o.evicted,
                "loaded": o.loaded, "cached": o.cached, "transport": o.transport, "settle_s": self.settle_s,
                "elapsed_ms": round(self.elapsed_ms, 1), "snapshots": self.snapshots}


class Switcher:
    """Runs switches one at a time, over every worker (a second waits for the first to finish)."""

    def __init__(self, settle_s: float, sleep: Callable[[float], None] = time.sleep):
        self.settle_s = settle_s
        self._sleep = sleep
        self._lock = threading.Lock()

    def switch(self, upkeep: Upkeep, model: StoredModel, exclusive: bool = False) -> SwitchReport:
        """Make `model` resident on `upkeep`'s worker, draining what must be unloaded (with exclusive,
        every other unpinned model)."""
        with self._lock:
            return _Switch(upkeep, model, self.settle_s, self._sleep, exclusive).run()


class _Switch:
    """One switch in progress."""

    def __init__(self, upkeep: Upkeep, model: StoredModel, settle_s: float, sleep: Callable[[float], None],
                 exclusive: bool):
        self.upkeep = upkeep
        self.executor = upkeep.executor
        self.model = model
        self.sleep = sleep
        self.settle_s = settle_s
        self.exclusive = exclusive
        self.report = SwitchReport(model.name, Outcome())
        self.started = time.monotonic()
        self.unloads_seen = 0

    def run(self) -> SwitchReport:
        ex = self.executor
        deadline = time.monotonic() + ex.settings.queue_timeout_s
        with ex.gates.lane(deadline, self.model.name):
            self.take("before_unload")
            if self.exclusive:
                ex.refresh()
                others = [n for n in ex.belief.resident() if n != self.model.name and n not in ex.belief.pinned]
                self.upkeep.drain(others, deadline)  # closed at once: their running streams complete
                for i, name in enumerate(others):
                    try:
                        ex.unload(name, self.report.outcome, "switch")
                    except ApiError:
                        ex.gates.reopen(others[i + 1:])  # not unloaded: they serve again
                        raise
                if others:
                    self.settle()  # read now, before any transfer; the load then needs no more room
            ex.bring(self.model, self.report.outcome, deadline, ex.settings.keep_alive_s, use=False,
                     before_load=self.settle)
            if "after_settle" not in self.report.snapshots:  # already resident: no load to settle before
                self.settle()
            ex.belief.chosen(self.model.name)  # "active" from now on, even if it was resident already
            self.take("after_load")
        outcome = self.report.outcome
        outcome.cached, outcome.loaded = ex.belief.cached(), ex.belief.resident()
        self.report.elapsed_ms = (time.monotonic() - self.started) * 1000
        log.info("[switch] %s: action=%s unloaded=[%s] evicted=[%s] in %.1fms (rss %s -> %s bytes)",
                 self.model.name, outcome.action, ", ".join(outcome.unloaded), ", ".join(outcome.evicted),
                 self.report.elapsed_ms, self.report.snapshots["before_unload"].get("rss_bytes"),
                 self.report.snapshots["after_load"].get("rss_bytes"))
        return self.report

    def settle(self) -> None:
        """After the unloads (called again if a refused load made more): read, wait, read."""
        unloaded = len(self.report.outcome.unloaded)
        if "after_settle" in self.report.snapshots and unloaded == self.unloads_seen:
            return  # a retried load with nothing new unloaded: the readings stand
        self.take("after_unload")
        if unloaded > self.unloads_seen and self.settle_s > 0:
            self.sleep(self.settle_s)
            self.report.settle_s += self.settle_s
        self.unloads_seen = unloaded
        self.take("after_settle")

    def take(self, label: str) -> None:
        """Read the worker's memory now; a reading that fails says why instead of inventing numbers."""
        at_ms = round((time.monotonic() - self.started) * 1000, 1)
        try:
            reading = dict(self.executor.worker.memory())
        except ApiError as err:
            log.warning("[switch] no memory reading %s: %s (%s)", label, err.code, err.message)
            reading = {"error": err.code}
        self.report.snapshots[label] = {"at_ms": at_ms, **reading}
