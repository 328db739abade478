"""The store's core: its workers (one slot each), the catalog, the events and the timers.

A slot bundles one worker's client, transport, belief, gates and executor. There is one slot
today; several workers are several slots, and `slot_for` is where placement will decide.
Routes reach all of it through `StoreCore` (and `store_core()` in routes), never through a
slot's fields.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from model_store_server.belief import WorkerBelief
from model_store_server.catalog import Catalog
from model_store_server.config import StoreConfig
from model_store_server.events import EventBus
from model_store_server.executor import Executor, Lease, Settings
from model_store_server.gates import WorkerGates
from model_store_server.metrics import StoreMetrics
from model_store_server.outcome import Outcome
from model_store_server.policy import build_policy
from model_store_server.switch import SwitchReport, Switcher
from model_store_server.transport import Transport, build_transport
from model_store_server.upkeep import Janitor, Upkeep
from model_store_server.worker_client import LoadedModel, WorkerClient
from model_swap.errors import ApiError

log = logging.getLogger(__name__)


@dataclass
class WorkerSlot:
    """One worker and the store's machinery for it."""

    name: str
    client: WorkerClient
    belief: WorkerBelief
    gates: WorkerGates
    executor: Executor
    upkeep: Upkeep


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
                               ("ttl", "lru-ttl") else None)
        for slot in slots:
            slot.executor.on_idle = self.janitor.ring
        self.switcher = Switcher(config.switch_settle_s)

    @property
    def policy_name(self) -> str:
        return self.config.cache_policy

    def slot_for(self, name: str) -> WorkerSlot:
        """The worker a request for `name` goes to (placement across workers comes with several)."""
        return self.slots[0]

    # ---- requests ------------------------------------------------------------------------

    def lease(self, name: str, keep_alive_s: float | None, outcome: Outcome) -> Lease:
        """Wait until `name` is resident on a worker and hold a use of it; `outcome` says what it took."""
        model = self.catalog.get(name)  # a 404 needs no turn
        return self.slot_for(name).executor.lease(model, keep_alive_s, outcome)

    def worker_failed(self, lease: Lease, err: ApiError) -> None:
        lease.executor.worker_failed(lease.model, err)

    def tiers(self, name: str) -> tuple[list[str], list[str]]:
        """The files on the disk and the models in memory of the worker `name` goes to."""
        belief = self.slot_for(name).belief
        return belief.cached(), belief.resident()

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

    def prefetch(self, name: str) -> Outcome:
        return self.slot_for(name).upkeep.bring(self.catalog.get(name), load=False)

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
                outcome = self.slot_for(name).upkeep.bring(self.catalog.get(name), load=True)
                log.info("[preload] %s: %s", name, outcome.action)
            except ApiError as err:
                log.warning("[preload] %s not loaded: %s (%s)", name, err.code, err.message)

    def unload(self, name: str, evict: bool = False) -> Outcome:
        return self.slot_for(name).upkeep.unload(name, evict)

    def reset(self) -> Outcome:
        outcomes = [slot.upkeep.reset() for slot in self.slots]
        return Outcome(action="reset", evicted=[n for o in outcomes for n in o.evicted])

    def reconcile(self) -> tuple[list[str], list[str]]:
        """Read every worker now and adopt what matches; what was kept and deleted on them."""
        kept: list[str] = []
        deleted: list[str] = []
        for slot in self.slots:
            k, d = slot.upkeep.reconcile()
            kept += k
            deleted += d
        return kept, deleted

    # ---- views ---------------------------------------------------------------------------

    def view(self) -> list[dict]:
        """Each worker as the store believes it, with its gates."""
        out = []
        for slot in self.slots:
            gates = slot.gates.snapshot()
            out.append({"name": slot.name, **slot.belief.view(gates["uses"]), "gates": gates})
        return out

    def worker_reports(self) -> list[dict]:
        """What each worker itself says it holds (or that it does not answer)."""
        reports = []
        for slot in self.slots:
            try:
                truth = slot.client.state()
            except ApiError:
                reports.append({"name": slot.name, "reachable": False, "loaded": [], "cached": []})
                continue
            reports.append({"name": slot.name, "reachable": True, "loaded": truth.loaded_names,
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
        """ok, unauthorized, unreachable or error: how the worker answers an authenticated call."""
        for slot in self.slots:
            try:
                slot.client.state()
            except ApiError as err:
                return {"unauthorized": "unauthorized", "worker_unavailable": "unreachable"}.get(err.code, "error")
        return "ok"

    def start(self, preload: bool = True) -> None:
        """Start the timers and, in the background, the preloads."""
        self.janitor.start()
        names = tuple(dict.fromkeys(self.config.pinned_models + self.config.preload_models))
        if preload and names:
            threading.Thread(target=self.preload, args=(names,), daemon=True, name="preload").start()

    def stop(self) -> None:
        self.janitor.stop()


def build_core(config: StoreConfig, worker=None, transport: Transport | None = None,
               clock: Callable[[], float] = time.monotonic) -> StoreCore:
    """The core for the config's worker; tests pass a fake worker (and transport) here."""
    worker = worker or WorkerClient(config.worker_url, config.worker_token, config.worker_timeout_s,
                                    config.models_config.settings_for)
    transport = transport or build_transport(config, worker)
    metrics, events, catalog = StoreMetrics(), EventBus(), Catalog(config.models_dir)
    policy = build_policy(config.cache_policy, config.max_cache_size, config.max_cache_bytes, config.ttl_seconds,
                          timer=clock)
    belief = WorkerBelief(policy, frozenset(config.pinned_models), config.keep_alive_seconds, clock)
    gates = WorkerGates(config.max_queue, clock)
    settings = Settings(config.max_swap_wait_ms / 1000, config.queue_timeout_s, config.keep_alive_seconds)
    executor = Executor(config.worker_url, worker, transport, belief, gates, catalog, settings, events, metrics,
                        clock)
    slot = WorkerSlot(config.worker_url, worker, belief, gates, executor, Upkeep(executor, clock))
    return StoreCore(config, catalog, [slot], events, metrics)
