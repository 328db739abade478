"""Carries out the planner's decisions on one worker and tells the belief and the gates what happened.

A request for an open model takes a use and goes (no plan, no lock but the gates'). Any other
request holds the worker's lane and walks: read the worker (`_refresh`), plan the disk tier,
wait for the busy models the plan frees (`_settle`), delete, transfer; then plan the memory
tier, wait again, unload, load; then open the model's gate with this request's use in it.
Resident models keep serving through all of it: only the models a change frees are closed,
and only once they are idle (or, after MAX_SWAP_WAIT_MS, closed to new requests so they drain).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

from model_store_server import planner
from model_store_server.belief import WorkerBelief
from model_store_server.catalog import Catalog, StoredModel
from model_store_server.events import EventBus, Ticker
from model_store_server.gates import LANE, QueueTimeout, WorkerGates
from model_store_server.measures import WorkerMeasures
from model_store_server.metrics import StoreMetrics
from model_store_server.outcome import Outcome
from model_store_server.planner import HIT, Plan, Want
from model_store_server.transport import Transport
from model_swap.errors import ApiError
from model_swap.once import Once

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 0.25
# Refusals: the store decided not to serve (nothing half-done); X-Cache-Action says "rejected".
REFUSALS = frozenset({"cache_full", "model_too_large", "insufficient_memory", "queue_full", "queue_timeout"})
LOAD_ATTEMPTS = 4


@dataclass(frozen=True)
class Settings:
    """The executor's knobs, from StoreConfig."""

    max_swap_wait_s: float = 2.0
    queue_timeout_s: float = 300.0
    keep_alive_s: float = 300.0


class Lease:
    """A request's use of a resident model; release() when its stream ends (idempotent)."""

    def __init__(self, executor: "Executor", name: str, keep_alive_s: float | None):
        self.executor = executor
        self.model = name
        started = executor._clock()
        self.release = Once(lambda: executor.end_use(name, keep_alive_s, executor._clock() - started))


class _NeedRoom(Exception):
    """The worker refused a load for memory: plan the memory tier again."""


class _Vanished(Exception):
    """The worker's copy of the file is gone: plan the disk tier again."""


class Executor:
    """Changes one worker's disk and memory as plans say; the only caller of the worker's change endpoints."""

    def __init__(self, name: str, worker, transport: Transport, belief: WorkerBelief, gates: WorkerGates,
                 catalog: Catalog, settings: Settings, events: EventBus, metrics: StoreMetrics,
                 clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.worker = worker
        self.transport = transport
        self.belief = belief
        self.gates = gates
        self.catalog = catalog
        self.settings = settings
        self.events = events
        self.metrics = metrics
        self._clock = clock
        self.measures = WorkerMeasures()  # what placement plans with: transfer rate, load and generation times
        self.on_idle: Callable[[], None] = lambda: None  # the janitor's bell: a model's keep-alive starts

    # ---- the request path ------------------------------------------------------------------

    def lease(self, model: StoredModel, keep_alive_s: float | None, outcome: Outcome) -> Lease:
        """Wait for `model` to be resident (bringing it in if this request is first) and take a use."""
        started = self._clock()
        deadline = started + self.settings.queue_timeout_s
        outcome.action = None
        keep = self.settings.keep_alive_s if keep_alive_s is None else keep_alive_s
        try:
            # A copy that is not the store's current file must be replaced first: no fast path then.
            grant = self.gates.enter(model.name, deadline, may_use=self.belief.has_copy(model.name, model.sha256))
            if grant == LANE:
                try:
                    self.bring(model, outcome, deadline, keep, use=True)
                finally:
                    self.gates.leave_lane()
            else:
                outcome.action = HIT
                self.belief.note_use(model.name, keep)
        except ApiError as err:
            if err.code in REFUSALS:
                outcome.action = "rejected"
                self.reject(model.name, err)
            raise
        outcome.queue_ms = (self._clock() - started) * 1000 - outcome.worker_ms
        self.metrics.queue_seconds.observe(max(0.0, outcome.queue_ms) / 1000)
        self.metrics.requests.labels(outcome.action).inc()
        self.metrics.worker_requests.labels(self.name, outcome.action).inc()
        outcome.worker = self.name
        outcome.cached, outcome.loaded = self.belief.cached(), self.belief.resident()
        return Lease(self, model.name, keep)

    def end_use(self, name: str, keep_alive_s: float | None, seconds: float | None = None) -> None:
        """A stream ended: recency in both tiers, the keep-alive from now; the janitor hears when idle."""
        self.belief.note_use(name, keep_alive_s)
        if seconds is not None:
            self.measures.generated(name, seconds)
        if self.gates.end_use(name) == 0:
            self.on_idle()

    def worker_failed(self, name: str, err: ApiError) -> None:
        """A generation failed on the worker: after a lost model, nobody else may start on it."""
        self.belief.on_worker_error(err)
        if err.code in ("model_not_loaded", "model_unloading"):
            self.gates.close([name])

    def reject(self, name: str, err: ApiError) -> None:
        self.metrics.rejections.labels(err.code).inc()
        self.metrics.requests.labels("rejected").inc()
        self.events.publish("rejected", worker=self.name, model=name, code=err.code)
        log.warning("[gate] %s refused: %s (%s)", name, err.code, err.message)

    # ---- one change, holding the lane ------------------------------------------------------

    def bring(self, model: StoredModel, outcome: Outcome, deadline: float, keep_alive_s: float, use: bool,
               load: bool = True, before_load: Callable[[], None] | None = None) -> str:
        """Make `model` resident (or, with load=False, cached); return the action it took.

        `before_load` runs after the unloads that make room and right before each load attempt."""
        want = Want(model.name, model.size, model.sha256)
        self.refresh()
        for _ in range(3):
            plan = self._settle(want, deadline, disk=True, outcome=outcome)
            outcome.action = plan.action if load else ("already_cached" if plan.disk.on_disk else "cached")
            if plan.action == HIT or (not load and plan.disk.on_disk):
                if not use or self.gates.take_use(model.name):
                    if use:
                        self.belief.note_use(model.name, keep_alive_s)
                    return outcome.action
                self.belief.mark_stale()  # resident by our belief, but its gate is shut: read the worker
                self.refresh()
                continue
            worker_started = self._clock()
            try:
                for name in plan.deleted:
                    if self.belief.is_resident(name):
                        self.unload(name, outcome, "evict")
                    self.delete(name, outcome, "evict")
                if not plan.disk.on_disk:
                    self._transfer(model, outcome)
                if load:
                    self._make_room_and_load(want, model, deadline, keep_alive_s, outcome, before_load)
            except _Vanished:
                continue
            finally:
                outcome.worker_ms += (self._clock() - worker_started) * 1000
            if load:
                self.gates.open(model.name, use=use)
                if use:
                    self.belief.note_use(model.name, keep_alive_s)
            return outcome.action
        raise ApiError(502, "worker_error", f"the worker kept losing {model.name}; giving up")

    def _make_room_and_load(self, want: Want, model: StoredModel, deadline: float, keep_alive_s: float,
                            outcome: Outcome, before_load: Callable[[], None] | None = None) -> None:
        for _ in range(LOAD_ATTEMPTS):
            plan = self._settle(want, deadline, disk=False)
            for name in plan.memory.unload + plan.memory.wait_for:
                self.unload(name, outcome, "lru")
            if before_load is not None:
                before_load()
            try:
                self._load(model, keep_alive_s)
                return
            except _NeedRoom:
                continue
        raise ApiError(507, "insufficient_memory", f"the worker kept refusing {model.name} for memory")

    def _settle(self, want: Want, deadline: float, disk: bool, outcome: Outcome | None = None) -> Plan:
        """Plan until the models the plan frees are idle, then close them (and commit the disk step).

        Until MAX_SWAP_WAIT_MS has passed, requests for a busy victim still start on it (they
        overtake this change); after that its gate closes, so it drains and this change goes next."""
        bound = self._clock() + self.settings.max_swap_wait_s
        draining: set[str] = set()
        try:
            while True:
                busy = self.gates.busy()
                decided = self._clock()
                snap = self.belief.snapshot(busy, frozenset(draining))
                plan = planner.plan(want, snap)
                if outcome is not None:
                    outcome.decision_ms = (self._clock() - decided) * 1000
                if plan.refusal:
                    r = plan.refusal
                    raise ApiError(r.status, r.code, r.message)
                if disk:
                    frees = tuple(n for n in plan.deleted if n in snap.resident)
                else:
                    frees = plan.memory.unload + plan.memory.wait_for
                if self.gates.try_close(frees):
                    if not disk or self.belief.commit_disk(want, plan.disk):
                        self.gates.reopen(draining - set(frees))
                        return plan
                    self.gates.reopen(frees)
                    continue
                now = self._clock()
                if now >= deadline:
                    raise QueueTimeout(want.name, now - (deadline - self.settings.queue_timeout_s))
                if now >= bound:
                    newly = self.gates.close(set(frees) & busy)
                    if newly:
                        log.info("[swap] %s waited %.0fms; new requests for %s now wait behind it", want.name,
                                 self.settings.max_swap_wait_s * 1000, ", ".join(sorted(newly)))
                    draining |= newly
                    self.gates.wait_for_change(deadline - now)
                else:
                    self.gates.wait_for_change(min(bound, deadline) - now)
        except BaseException:
            self.gates.reopen(draining)
            raise

    # ---- the effects -------------------------------------------------------------------------

    def refresh(self) -> tuple[list[str], list[str]] | None:
        """Read the worker (its boot id, files, memory); reconcile first if it is not what we believe.

        Returns what a reconciliation kept and deleted on the worker, or None if there was none."""
        try:
            state = self.worker.state()
        except ApiError as err:
            self.belief.on_worker_error(err)
            raise
        found = self.belief.observe(state, self._our_copy)
        result = None
        if found is not None:
            if found.restarted:
                log.warning("[reconcile] the worker restarted (new boot id); reconciling")
            removed = [name for name, why in found.strays if self._delete_stray(name, why)]
            log.info("[reconcile] adopted=[%s] removed=[%s] loaded=[%s]", ", ".join(found.adopted),
                     ", ".join(removed), ", ".join(self.belief.resident()))
            result = list(found.adopted), removed
        self.gates.sync(self.belief.resident())
        return result

    def _our_copy(self, name: str) -> tuple[StoredModel | None, str]:
        """The store's copy of a file the worker has, or None and why the worker's copy must go."""
        if not self.catalog.has(name):
            return None, f"not in MODELS_DIR ({self.catalog.root})"
        try:
            return self.catalog.get(name), ""
        except ApiError as err:
            return None, f"not usable in MODELS_DIR ({err.code})"

    def _delete_stray(self, name: str, why: str) -> bool:
        """Delete a file on the worker, saying why at WARNING; only an unreachable worker stops the caller."""
        log.warning("[reconcile] deleting %s on the worker: %s", name, why)
        try:
            self.worker.delete(name)
        except ApiError as err:
            self.belief.on_worker_error(err)
            if err.code == "worker_unavailable":
                raise
            log.warning("[reconcile] could not delete %s on the worker: %s", name, err.message)
            return False
        return True

    def unload(self, name: str, outcome: Outcome | None, reason: str) -> None:
        """Unload a closed, idle model from the worker's memory."""
        started = self._clock()
        try:
            self.worker.unload(name)
        except ApiError as err:
            self.belief.on_worker_error(err)
            self.gates.reopen([name])
            raise
        self.belief.unloaded(name)
        self.gates.forget(name)
        ms = (self._clock() - started) * 1000
        self.metrics.unloads.labels(reason).inc()
        self.events.publish("unloaded", worker=self.name, model=name, reason=reason, ms=round(ms, 1))
        log.info("[swap] unloaded %s from the worker's memory (%s) in %.1fms", name, reason, ms)
        if outcome is not None:
            outcome.unloaded.append(name)

    def delete(self, name: str, outcome: Outcome | None, reason: str) -> None:
        """Delete a file from the worker's disk (it is not resident, or the worker unloads it first)."""
        started = self._clock()
        try:
            self.worker.delete(name)
        except ApiError as err:
            self.belief.on_worker_error(err)
            raise
        self.belief.forget_file(name)
        self.gates.forget(name)
        ms = (self._clock() - started) * 1000
        self.metrics.evictions.inc()
        self.events.publish("evicted", worker=self.name, model=name, reason=reason, ms=round(ms, 1))
        log.info("[swap] evicted %s from the worker's disk (%s) in %.1fms", name, reason, ms)
        if outcome is not None:
            outcome.evicted.append(name)

    def _transfer(self, model: StoredModel, outcome: Outcome) -> None:
        name = model.name
        self.belief.begin_op(name, "transfer", model.size)
        self.events.publish("transfer_started", worker=self.name, model=name, bytes_total=model.size,
                            transport=self.transport.name)

        def report() -> None:
            op = self.belief.progress_of(name)
            if op is not None:
                self.events.publish("transfer_progress", worker=self.name, model=name, bytes_done=op.bytes_done,
                                    bytes_total=op.bytes_total)

        ticker = Ticker(PROGRESS_EVERY_S, report)
        try:
            sent = self.transport.send(model, lambda done: self.belief.progress(name, done))
        except BaseException as err:
            self.belief.forget_file(name)
            if isinstance(err, ApiError):
                self.belief.on_worker_error(err)
                self.events.publish("transfer_failed", worker=self.name, model=name, code=err.code)
            else:
                self.belief.mark_stale()
            raise
        finally:
            ticker.stop()
            self.belief.end_op(name)
        self.belief.admitted(name, model.sha256)
        self.measures.transferred(model.size, sent.seconds)
        rate = model.size / sent.seconds / 1e9 if sent.seconds else 0.0
        self.metrics.bytes_sent.labels(sent.transport).inc(model.size)
        self.metrics.transfer_seconds.labels(sent.transport).observe(sent.seconds)
        self.events.publish("transfer_done", worker=self.name, model=name, bytes_total=model.size,
                            seconds=round(sent.seconds, 3), gb_per_s=round(rate, 3), transport=sent.transport)
        log.info("[swap] sent %s (%d bytes) over %s in %.1fms (%.2f GB/s)", name, model.size, sent.transport,
                 sent.seconds * 1000, rate)
        outcome.transport = sent.transport

    def _load(self, model: StoredModel, keep_alive_s: float) -> None:
        name = model.name
        self.belief.begin_op(name, "load", model.size)
        self.events.publish("load_started", worker=self.name, model=name)
        started = self._clock()
        try:
            self.worker.load_local(name)
        except ApiError as err:
            self.events.publish("load_failed", worker=self.name, model=name, code=err.code)
            self._load_failed(model, err)
            raise
        finally:
            self.belief.end_op(name)
        seconds = self._clock() - started
        self.belief.loaded(name, keep_alive_s)
        self.measures.loaded(name, seconds)
        self.metrics.load_seconds.observe(seconds)
        self.events.publish("loaded", worker=self.name, model=name, ms=round(seconds * 1000, 1))
        log.info("[swap] loaded %s on the worker in %.1fms", name, seconds * 1000)
        self.gates.retry_after_s = max(1, math.ceil(seconds))
        self.refresh()  # what the load really took, in memory

    def _load_failed(self, model: StoredModel, err: ApiError) -> None:
        """Turn a refused load into the next step: more room, the file again, or an error."""
        name = model.name
        if err.code == "insufficient_memory":
            self.belief.on_worker_error(err)
            self.refresh()
            snap = self.belief.snapshot()
            need = err.details.get("need_bytes")  # the worker's estimate for this model, with its settings
            if isinstance(need, int) and not isinstance(need, bool) and need > 0:
                self.belief.learn_need(name, need)
            elif snap.budget_bytes is not None:
                self.belief.learn_need(name, snap.budget_bytes - (snap.used_bytes or 0) + 1)
            log.warning("[swap] the worker has no memory for %s yet; making more room", name)
            raise _NeedRoom() from err
        if err.code == "model_not_cached":
            log.warning("[swap] %s vanished from the worker's disk; sending it again", name)
            self.belief.forget_file(name)
            raise _Vanished() from err
        if err.code == "load_failed":  # a file the worker cannot load is no use cached
            try:
                self.delete(name, None, "load_failed")
            except ApiError:
                pass
            self.belief.forget_file(name)
        self.belief.on_worker_error(err)
