"""The store's core: its workers (one slot each), the catalog, the events and the timers.

A slot bundles one worker's client, transport, belief, gates, executor and health; several
workers are several slots, and `place` (placement.py's rules over every slot's facts) decides
which one a request goes to.
Routes reach all of it through `StoreCore` (and `store_core()` in routes), never through a
slot's fields.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from model_store_server.belief import WorkerBelief
from model_store_server.catalog import Catalog, StoredModel
from model_store_server.config import StoreConfig
from model_store_server.events import EventBus
from model_store_server.executor import Executor, Lease, Settings
from model_store_server.failover import Prober, WorkerHealth
from model_store_server.gates import WorkerGates
from model_store_server.metrics import StoreMetrics
from model_store_server.outcome import Outcome
from model_store_server.placement import Placement, WorkerFacts, place
from model_store_server.planner import Want
from model_store_server.policy import build_policy
from model_store_server.switch import SwitchReport, Switcher
from model_store_server.transport import Transport, build_transport
from model_store_server.upkeep import Janitor, Upkeep
from model_store_server.worker_client import LoadedModel, WorkerClient, WorkerUnavailable
from model_store_server.workers_config import WorkerSpec
from model_swap.errors import ApiError

log = logging.getLogger(__name__)
ONLY = "only"  # the placement of a store with one worker


@dataclass
class WorkerSlot:
    """One worker and the store's machinery for it."""

    name: str
    client: WorkerClient
    belief: WorkerBelief
    gates: WorkerGates
    executor: Executor
    upkeep: Upkeep
    spec: WorkerSpec
    health: WorkerHealth = field(default_factory=WorkerHealth)

    @property
    def url(self) -> str:
        return self.spec.url

    def facts(self) -> WorkerFacts:
        """What placement reads about this worker now."""
        gates = self.gates.snapshot()
        rate, load_s, generation_s = self.executor.measures.figures()
        busy = frozenset(m for m, n in gates["uses"].items() if n > 0)
        incoming = frozenset(self.belief.in_flight()) | frozenset(gates["waiting"])
        return WorkerFacts(self.name, self.belief.snapshot(busy), self.health.up, gates["uses"], incoming,
                           gates["lane_queue"], rate, load_s, generation_s, self.belief.slots())


class StoreCore:
    """Leases for requests, admin actions and views over the store's workers."""

    def __init__(self, config: StoreConfig, catalog: Catalog, slots: list[WorkerSlot], events: EventBus,
                 metrics: StoreMetrics):
        self.config = config
        self.catalog = catalog
        self.slots = slots
        self.events = events
        self.metrics = metrics
        self.janitor = Janitor([s.upkeep for s in slots], config.ttl_seconds if config.cache_policy in
                               ("ttl", "lru-ttl") else None, skip=self._is_down, on_unavailable=self._sweep_failed)
        self.prober = Prober(slots, self._came_back)
        for slot in slots:
            slot.executor.on_idle = self.janitor.ring
        self.switcher = Switcher(config.switch_settle_s)

    @property
    def policy_name(self) -> str:
        return self.config.cache_policy

    def slot_named(self, worker: str | None) -> WorkerSlot | None:
        """The slot of the worker called `worker` (None: no choice made); 404 unknown_worker if there is none."""
        if worker is None:
            return None
        for slot in self.slots:
            if slot.name == worker:
                return slot
        raise ApiError(404, "unknown_worker", f"no worker named {worker!r}; workers: "
                       f"{', '.join(s.name for s in self.slots)}")

    def place(self, model: StoredModel) -> tuple[WorkerSlot, Placement]:
        """The worker a request for `model` goes to, by placement's rules; 502 worker_unavailable if none is up."""
        if len(self.slots) == 1:  # one worker: nothing to choose, and a down worker answers for itself
            return self.slots[0], Placement(self.slots[0].name, ONLY)
        chosen = place(Want(model.name, model.size, model.sha256), [s.facts() for s in self.slots],
                       self.config.max_replicas, self.config.max_swap_wait_ms / 1000)
        if chosen is None:
            raise WorkerUnavailable(f"no worker answers; {len(self.slots)} down, probing with backoff")
        return next(s for s in self.slots if s.name == chosen.worker), chosen

    def slot_for(self, name: str) -> WorkerSlot:
        """The worker a request for `name` would go to now (the first one up for a name the store lacks)."""
        if len(self.slots) > 1:
            try:
                return self.place(self.catalog.get(name))[0]
            except ApiError:
                pass
        return next((s for s in self.slots if s.health.up), self.slots[0])

    # ---- requests ------------------------------------------------------------------------

    def lease(self, name: str, keep_alive_s: float | None, outcome: Outcome) -> Lease:
        """Wait until `name` is resident on a worker and hold a use of it; `outcome` says what it took.

        A worker found down before anything was done there for this request is skipped and the
        request placed again; once its change had begun, the request fails (502 worker_unavailable)."""
        model = self.catalog.get(name)  # a 404 needs no turn
        for _ in self.slots:
            started = time.perf_counter()
            slot, chosen = self.place(model)
            outcome.placement_ms = (time.perf_counter() - started) * 1000
            outcome.worker, outcome.placement = slot.name, chosen.rule
            try:
                return slot.executor.lease(model, keep_alive_s, outcome)
            except ApiError as err:
                if err.code != "worker_unavailable":
                    raise
                self.worker_down(slot, err.message)
                if outcome.decided or len(self.slots) == 1:
                    raise
        raise WorkerUnavailable(f"no worker answers for {name}")

    def worker_failed(self, lease: Lease, err: ApiError) -> None:
        lease.executor.worker_failed(lease.model, err)
        if err.code == "worker_unavailable":
            self.worker_down(next(s for s in self.slots if s.executor is lease.executor), err.message)

    def worker_down(self, slot: WorkerSlot, reason: str) -> None:
        """`slot`'s worker stopped answering: place nothing there until a probe reads it again."""
        if len(self.slots) == 1:
            return  # one worker: nowhere else to go; the next request reads it again, as it always did
        slot.belief.mark_stale()
        if slot.health.went_down(reason):
            log.warning("[failover] worker %s is down (%s); placing requests elsewhere, probing with backoff",
                        slot.name, reason)
            self.events.publish("worker_down", worker=slot.name, reason=reason)
            self.metrics.worker_up.labels(slot.name).set(0)
            self.prober.ring()

    def _is_down(self, upkeep: Upkeep) -> bool:
        return not next(s for s in self.slots if s.upkeep is upkeep).health.up

    def _sweep_failed(self, upkeep: Upkeep, err: ApiError) -> None:
        self.worker_down(next(s for s in self.slots if s.upkeep is upkeep), err.message)

    def _came_back(self, slot: WorkerSlot, found: tuple[list[str], list[str]]) -> None:
        kept, deleted = found
        log.warning("[failover] worker %s answers again: kept [%s], deleted [%s]", slot.name, ", ".join(kept),
                    ", ".join(deleted))
        self.events.publish("worker_up", worker=slot.name, kept=kept, deleted=deleted)
        self.metrics.worker_up.labels(slot.name).set(1)

    def tiers(self, name: str, worker: str | None = None) -> tuple[list[str], list[str]]:
        """The files on the disk and the models in memory of the worker named, else of the one `name` goes to."""
        belief = (self.slot_named(worker) or self.slot_for(name)).belief
        return belief.cached(), belief.resident()

    def active_model(self) -> str | None:
        """The model most recently loaded or switched to on the first worker (what a request for "active"
        means), or None."""
        return self.slots[0].belief.active()

    def progress_text(self, name: str) -> str:
        """What a request waiting for `name` is waiting for, in a few words."""
        slot = self.slot_for(name)
        op = slot.belief.progress_of(name)
        if op is None:
            return f"waiting for {name}" if not slot.belief.is_resident(name) else f"{name} is ready"
        if op.op == "transfer" and op.bytes_total:
            return f"transferring {name}... {100 * op.bytes_done // op.bytes_total}%"
        return f"loading {name}..."

    # ---- admin ---------------------------------------------------------------------------

    def prefetch(self, name: str, worker: str | None = None) -> Outcome:
        """Put `name` on a worker's disk: the one named, else where placement would send it."""
        slot = self.slot_named(worker) or self.slot_for(name)
        outcome = slot.upkeep.bring(self.catalog.get(name), load=False)
        outcome.worker = slot.name
        return outcome

    def load(self, name: str) -> Outcome:
        """Transfer if needed and load `name`, making room as a request would (no use is held)."""
        return self.slot_for(name).upkeep.bring(self.catalog.get(name), load=True)

    def switch(self, name: str, exclusive: bool = False) -> SwitchReport:
        """Make `name` resident now, with the worker's memory read around the unloads and the load."""
        model = self.catalog.get(name)
        return self.switcher.switch(self.slot_for(name).upkeep, model, exclusive)

    def preload(self, names: tuple[str, ...]) -> None:
        """Transfer and load each model (PRELOAD_MODELS, PINNED_MODELS); failures are logged."""
        for name in names:
            try:
                slot = self.slot_for(name)
                outcome = slot.upkeep.bring(self.catalog.get(name), load=True)
                log.info("[preload] %s on %s: %s", name, slot.name, outcome.action)
            except ApiError as err:
                log.warning("[preload] %s not loaded: %s (%s)", name, err.code, err.message)

    def unload(self, name: str, evict: bool = False, worker: str | None = None) -> Outcome:
        """Unload (and with evict=True delete) `name` on the worker named, else on every worker that holds it."""
        chosen = self.slot_named(worker)
        slots = [chosen] if chosen else [s for s in self.slots if s.health.up and
                                         (s.belief.is_resident(name) or name in s.belief.cached())]
        outcomes = [slot.upkeep.unload(name, evict) for slot in slots or [self.slot_for(name)]]
        last = outcomes[-1]
        return Outcome(action=last.action, evicted=[n for o in outcomes for n in o.evicted],
                       unloaded=[n for o in outcomes for n in o.unloaded], cached=last.cached, loaded=last.loaded,
                       worker=",".join(s.name for s in slots))

    def reset(self, worker: str | None = None) -> Outcome:
        """Empty the worker named, else every worker."""
        chosen = self.slot_named(worker)
        outcomes = [slot.upkeep.reset() for slot in ([chosen] if chosen else self.slots)]
        return Outcome(action="reset", evicted=[n for o in outcomes for n in o.evicted])

    def reconcile(self) -> tuple[list[str], list[str]]:
        """Read every worker now and adopt what matches; what was kept and deleted on them.

        With several workers, one that does not answer is marked down (and probed) rather than
        stopping the others; only when none answers is the error raised."""
        kept: list[str] = []
        deleted: list[str] = []
        failure: ApiError | None = None
        for slot in self.slots:
            try:
                k, d = slot.upkeep.reconcile()
            except ApiError as err:
                if err.code != "worker_unavailable" or len(self.slots) == 1:
                    raise
                self.worker_down(slot, err.message)
                failure = err
                continue
            kept += k
            deleted += d
        if failure is not None and not any(s.health.up for s in self.slots):
            raise failure
        return kept, deleted

    # ---- views ---------------------------------------------------------------------------

    def view(self) -> list[dict]:
        """Each worker as the store believes it, with its gates."""
        out = []
        for slot in self.slots:
            gates = slot.gates.snapshot()
            rate, load_s, generation_s = slot.executor.measures.figures()
            out.append({"name": slot.name, "url": slot.url, **slot.belief.view(gates["uses"]), "gates": gates,
                        "max_cache_size": slot.spec.max_cache_size, "max_cache_bytes": slot.spec.max_cache_bytes,
                        "health": slot.health.view(),
                        "measured": {"transfer_bytes_per_s": None if rate is None else round(rate),
                                     "load_s": {k: round(v, 4) for k, v in load_s.items()},
                                     "generation_s": {k: round(v, 4) for k, v in generation_s.items()}}})
        return out

    def worker_reports(self) -> list[dict]:
        """What each worker itself says it holds (or that it does not answer)."""
        reports = []
        for slot in self.slots:
            try:
                truth = slot.client.state()
            except ApiError:
                reports.append({"name": slot.name, "url": slot.url, "reachable": False, "loaded": [], "cached": []})
                continue
            reports.append({"name": slot.name, "url": slot.url, "reachable": True, "loaded": truth.loaded_names,
                            "cached": [c.get("name") for c in truth.cached], "boot_id": truth.boot_id})
        return reports

    def expires_at(self, name: str) -> float | None:
        """When `name` leaves its worker by itself (clock time): its keep-alive if resident, else a ttl; or None."""
        slot = self.slot_for(name)
        return slot.belief.expires_at(name, busy=bool(slot.gates.snapshot()["uses"].get(name)))

    def worker_loaded(self) -> list[LoadedModel]:
        """The models each worker itself says it has in memory, in its load order (unreachable ones: none)."""
        loaded: list[LoadedModel] = []
        for slot in self.slots:
            try:
                loaded += slot.client.state().loaded
            except ApiError as err:
                log.warning("[core] worker %s did not list its models: %s", slot.name, err.code)
        return loaded

    def worker_status(self) -> str:
        """ok, unauthorized, unreachable or error: how the workers answer an authenticated call (the first trouble)."""
        return next((w["status"] for w in self.worker_statuses() if w["status"] != "ok"), "ok")

    def worker_statuses(self) -> list[dict]:
        """Each worker's name, URL, whether placement uses it, and how it answers an authenticated call now."""
        out = []
        for slot in self.slots:
            try:
                slot.client.state()
                status = "ok"
            except ApiError as err:
                status = {"unauthorized": "unauthorized", "worker_unavailable": "unreachable"}.get(err.code, "error")
            out.append({"name": slot.name, "url": slot.url, "status": status, "up": slot.health.up})
        return out

    def start(self, preload: bool = True) -> None:
        """Start the timers and, in the background, the preloads."""
        self.janitor.start()
        self.prober.start()
        names = tuple(dict.fromkeys(self.config.pinned_models + self.config.preload_models))
        if preload and names:
            threading.Thread(target=self.preload, args=(names,), daemon=True, name="preload").start()

    def stop(self) -> None:
        self.janitor.stop()
        self.prober.stop()


def build_core(config: StoreConfig, worker=None, transport: Transport | None = None,
               clock: Callable[[], float] = time.monotonic) -> StoreCore:
    """The core for the config's workers, one slot each; tests pass a fake worker (or a list, one per worker)."""
    specs = config.worker_specs()
    fakes = list(worker) if isinstance(worker, (list, tuple)) else [worker] * len(specs) if worker else None
    if fakes is not None and len(fakes) != len(specs):
        raise ValueError(f"{len(fakes)} workers given for {len(specs)} configured")
    metrics, events, catalog = StoreMetrics(), EventBus(), Catalog(config.models_dir)
    settings = Settings(config.max_swap_wait_ms / 1000, config.queue_timeout_s, config.keep_alive_seconds)
    slots = []
    for i, spec in enumerate(specs):
        client = fakes[i] if fakes else WorkerClient(spec.url, config.worker_token, config.worker_timeout_s,
                                                     config.models_config.settings_for)
        sender = transport or build_transport(config, client, spec.rdma_host, spec.rdma_port)
        policy = build_policy(config.cache_policy, spec.max_cache_size, spec.max_cache_bytes, config.ttl_seconds,
                              timer=clock)
        belief = WorkerBelief(policy, frozenset(config.pinned_models), config.keep_alive_seconds, clock)
        gates = WorkerGates(config.max_queue, clock)
        executor = Executor(spec.name, client, sender, belief, gates, catalog, settings, events, metrics, clock)
        slots.append(WorkerSlot(spec.name, client, belief, gates, executor, Upkeep(executor, clock), spec,
                                WorkerHealth(config.probe_max_s, clock)))
        metrics.worker_up.labels(spec.name).set(1)
    return StoreCore(config, catalog, slots, events, metrics)
