"""Changes that no user request asks for: keep-alive and ttl sweeps by timer, preloads, admin actions.

Each holds the worker's lane like any change and uses the executor's effects, so the locking
rules are the same as for a swap: a busy model is drained, never cut off.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from model_store_server.background import BellThread
from model_store_server.catalog import StoredModel
from model_store_server.executor import Executor
from model_store_server.gates import QueueTimeout
from model_store_server.outcome import Outcome
from model_swap.errors import ApiError

log = logging.getLogger(__name__)
IDLE_POLL_S = 30.0  # the janitor's longest sleep when nothing is due


class Upkeep:
    """Sweeps and admin actions on one worker, through its executor."""

    def __init__(self, executor: Executor, clock: Callable[[], float] = time.monotonic):
        self.executor = executor
        self.belief = executor.belief
        self.gates = executor.gates
        self._clock = clock

    def _deadline(self) -> float:
        return self._clock() + self.executor.settings.queue_timeout_s

    # ---- timers ------------------------------------------------------------------------------

    def next_due(self, ttl_poll_s: float | None) -> float | None:
        """When this worker next needs a sweep (clock time), or None if nothing is due."""
        due = self.belief.next_expiry(self.gates.busy())
        if ttl_poll_s is not None and self.belief.timed and self.belief.cached():
            poll = self._clock() + ttl_poll_s
            due = poll if due is None else min(due, poll)
        return due

    def sweep(self) -> None:
        """Unload idle models whose keep-alive ran out; delete files a ttl policy expired."""
        if not self.belief.expired_idle(self.gates.busy()) and not (self.belief.timed and self.belief.expired_files()):
            return
        with self.gates.lane(self._deadline(), "sweep"):
            for name in self.belief.expired_idle(self.gates.busy()):
                if self.gates.try_close([name]):
                    self.executor.unload(name, None, "keep_alive")
            for name in self.belief.expired_files() if self.belief.timed else []:
                if self.belief.is_resident(name):
                    if not self.gates.try_close([name]):
                        continue  # in use: it comes back to life when its stream ends
                    self.executor.unload(name, None, "ttl")
                self.executor.delete(name, None, "ttl")

    # ---- admin -------------------------------------------------------------------------------

    def bring(self, model: StoredModel, load: bool) -> Outcome:
        """Transfer (and with load=True, load) a model without a request's use: prefetch and preload."""
        outcome = Outcome()
        with self.gates.lane(self._deadline(), model.name):
            self.executor.bring(model, outcome, self._deadline(), self.executor.settings.keep_alive_s,
                                 use=False, load=load)
        outcome.cached, outcome.loaded = self.belief.cached(), self.belief.resident()
        return outcome

    def unload(self, name: str, evict: bool) -> Outcome:
        """Unload `name` from memory (and with evict=True delete its file); waits for its streams."""
        if name in self.belief.pinned:
            raise ApiError(409, "model_pinned", f"{name} is pinned (PINNED_MODELS); it stays")
        outcome = Outcome(action="evict" if evict else "unload")
        deadline = self._deadline()
        with self.gates.lane(deadline, name):
            self.executor.refresh()
            if self.belief.is_resident(name):
                self.drain([name], deadline)
                self.executor.unload(name, outcome, "admin")
            if evict and name in self.belief.cached():
                self.executor.delete(name, outcome, "admin")
        outcome.cached, outcome.loaded = self.belief.cached(), self.belief.resident()
        return outcome

    def reset(self) -> Outcome:
        """Unload and delete everything on the worker and empty the belief; waits for running streams."""
        outcome = Outcome(action="reset")
        deadline = self._deadline()
        with self.gates.lane(deadline, "reset"):
            resident = self.belief.resident()
            self.drain(resident, deadline)
            try:
                self.executor.worker.unload()
                state = self.executor.worker.state()
            except ApiError as err:
                self.belief.on_worker_error(err)
                self.gates.reopen(resident)
                raise
            for name in resident:
                self.gates.forget(name)
            for entry in state.cached:
                name = entry.get("name")
                try:
                    self.executor.worker.delete(name)
                    outcome.evicted.append(name)
                except ApiError as err:
                    if err.code == "worker_unavailable":
                        self.belief.mark_stale()
                        raise
                    log.warning("[reset] could not delete %r on the worker: %s", name, err.message)
            self.belief.cleared()
            self.executor.refresh()
        log.info("[reset] worker emptied: [%s]", ", ".join(outcome.evicted))
        return outcome

    def reconcile(self) -> tuple[list[str], list[str]]:
        """Read the worker now and adopt what matches (start-up); what was kept and deleted there."""
        self.belief.mark_stale()
        with self.gates.lane(self._deadline(), "reconcile"):
            return self.executor.refresh() or ([], [])

    def drain(self, names: list[str], deadline: float) -> None:
        """Close `names` at once and wait until their streams end (the admin asked for it)."""
        closed = self.gates.close(names)
        while not self.gates.try_close(names):
            now = self._clock()
            if now >= deadline:
                self.gates.reopen(closed)
                raise QueueTimeout(", ".join(names), self.executor.settings.queue_timeout_s)
            self.gates.wait_for_change(deadline - now)


class Janitor(BellThread):
    """One thread that wakes when a keep-alive or a ttl runs out and sweeps every worker; ring() when
    something became idle or changed."""

    def __init__(self, upkeeps: list[Upkeep], ttl_seconds: float | None,
                 clock: Callable[[], float] = time.monotonic, skip: Callable[[Upkeep], bool] = lambda u: False,
                 on_unavailable: Callable[[Upkeep, ApiError], None] = lambda u, err: None):
        super().__init__("janitor")
        self._upkeeps = upkeeps
        self._skip = skip  # a worker that is down: the prober reads it, not the sweeps
        self._on_unavailable = on_unavailable
        # A ttl file is swept within a quarter of its ttl (cachetools does not say when the next expires).
        self._ttl_poll_s = None if not ttl_seconds else min(1.0, max(0.05, ttl_seconds / 4))
        self._clock = clock

    def _run(self) -> None:
        while not self.stopped:
            upkeeps = [u for u in self._upkeeps if not self._skip(u)]
            dues = [d for u in upkeeps if (d := u.next_due(self._ttl_poll_s)) is not None]
            timeout = IDLE_POLL_S if not dues else max(0.0, min(dues) - self._clock())
            self._sleep(min(timeout, IDLE_POLL_S))
            if self.stopped:
                return
            for upkeep in upkeeps:
                try:
                    upkeep.sweep()
                except ApiError as err:
                    log.warning("[janitor] sweep of %s failed: %s (%s)", upkeep.executor.name, err.code, err.message)
                    if err.code == "worker_unavailable" and len(self._upkeeps) > 1:
                        self._on_unavailable(upkeep, err)  # the others' sweeps need not wait for it
                    else:
                        self._stopped.wait(1.0)  # an unreachable worker: do not spin
                except Exception:
                    log.exception("[janitor] sweep failed")
                    self._stopped.wait(1.0)
