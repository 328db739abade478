"""Makes the worker hold the model a request needs: the effects the policy decides, in order.

Every change to the worker (transfer, load, eviction, reset, reconciliation) happens while
holding the scheduler's exclusive access, so the policy's view and the worker's disk agree
whenever no change is in progress. Requests for the model that is loaded share the worker.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterator

from model_store_server.catalog import Catalog, StoredModel
from model_store_server.metrics import StoreMetrics
from model_store_server.outcome import Lease, Outcome, SwapFailed
from model_store_server.policy import CacheFull, CachePolicy, TooLargeForCache
from model_store_server.scheduler import Scheduler
from model_store_server.transport import Transport
from model_store_server.worker_client import WorkerClient, WorkerState
from model_swap.errors import ApiError
from model_swap.names import check_model_name

log = logging.getLogger(__name__)
# Worker errors after which the store's view of the worker may be wrong.
STALE_CODES = frozenset({"worker_unavailable", "worker_error", "model_not_loaded", "load_failed"})


def _valid_entries(entries: list[dict], context: str) -> Iterator[dict]:
    """The worker's listing entries whose names pass the name check; the rest are logged and skipped."""
    for entry in entries:
        try:
            check_model_name(entry.get("name"))
        except ApiError:
            log.warning("[%s] ignoring a worker entry with an invalid name: %r", context, entry.get("name"))
            continue
        yield entry


class Swapper:
    """Owns the policy and the store's belief of the worker's state."""

    def __init__(self, catalog: Catalog, policy: CachePolicy, worker: WorkerClient, transport: Transport,
                 metrics: StoreMetrics):
        self.catalog = catalog
        self.policy = policy
        self.worker = worker
        self.transport = transport
        self.metrics = metrics
        self.scheduler = Scheduler()
        self._policy_lock = threading.Lock()  # cachetools caches are not thread-safe
        self._loaded: str | None = None
        self._admitted_sha: dict[str, str] = {}  # digest of the copy each cached model has on the worker
        self._stale = True  # the worker's state must be read before the next change
        self._boot_id: str | None = None  # the worker process our belief is about
        self.last_reconciled = Outcome("reconciled")  # what the last reconciliation kept and deleted

    def cached(self) -> list[str]:
        with self._policy_lock:
            return self.policy.entries()

    def loaded(self) -> str | None:
        return self._loaded

    def expires_at(self, name: str) -> float | None:
        """When the policy's ttl for `name` runs out (time.monotonic clock), or None if never."""
        with self._policy_lock:
            return self.policy.expires_at(name)

    def lease(self, name: str) -> Lease:
        """Wait for the turn of a request for `name` and make sure the worker has it loaded."""
        model = self.catalog.get(name)  # a 404 needs no turn
        if self.scheduler.acquire(name):
            outcome = Outcome()
            try:
                self._ensure_loaded(model, outcome)
            except ApiError as err:
                self.scheduler.release_exclusive()
                outcome.cached = self.cached()
                raise SwapFailed(err, outcome) from err
            except BaseException:
                self.scheduler.release_exclusive()
                raise
            self.scheduler.downgrade(name)
        else:
            started = time.perf_counter()
            try:
                with self._policy_lock:
                    self.policy.use(name)
            except BaseException:
                self.scheduler.release_shared()
                raise
            outcome = Outcome("already_loaded", decision_ms=(time.perf_counter() - started) * 1000)
        outcome.cached = self.cached()
        self.metrics.requests.labels(outcome.action).inc()
        return Lease(outcome, lambda: self._end_use(name))

    def _end_use(self, name: str) -> None:
        """A request's stream ended: its model was used until now (ttl counts from here)."""
        try:
            with self._policy_lock:
                self.policy.use(name)
        finally:
            self.scheduler.release_shared()

    def worker_state(self) -> WorkerState:
        """The worker's own listing (noting a restart, if its boot id changed)."""
        state = self.worker.state()
        self._note_boot(state.boot_id)
        return state

    def worker_status(self) -> str:
        """ok, unauthorized, unreachable or error (noting a restart, if its boot id changed)."""
        status, state = self.worker.status()
        if state is not None:
            self._note_boot(state.boot_id)
        return status

    def _note_boot(self, boot_id: str | None) -> None:
        """Compare the worker's boot id with the one our belief is about; a new one voids the belief."""
        if boot_id is None:
            return
        if self._boot_id is not None and boot_id != self._boot_id:
            log.warning("[reconcile] the worker restarted (boot id %s, was %s); reading its state again",
                        boot_id[:8], self._boot_id[:8])
            self.worker_lost_model()
        self._boot_id = boot_id

    def _check_worker_boot(self, model: StoredModel | None) -> None:
        """Before deciding anything, make sure the worker is the process our belief is about.

        Skipped for a hit on the loaded model: if the worker restarted, its 409 says so.
        """
        if self._stale or (model is not None and self._loaded == model.name
                           and self._admitted_sha.get(model.name) == model.sha256):
            return
        self._note_boot(self.worker.boot_id())

    def mark_stale(self) -> None:
        """The worker may have changed behind our back (restart, lost connection)."""
        self._stale = True

    def worker_lost_model(self) -> None:
        """The worker no longer has the model we believed loaded (it restarted): nobody may
        join the current share, so the next request waits for exclusive access and reconciles."""
        self._loaded = None
        self._stale = True
        self.scheduler.close_share()

    def _ensure_loaded(self, model: StoredModel, outcome: Outcome) -> None:
        try:
            self._check_worker_boot(model)
            if self._stale:
                self._reconcile()
            self._bring(model, True, outcome)
        except ApiError as err:
            if err.code in STALE_CODES:
                self._stale = True
            raise

    def _bring(self, model: StoredModel, load: bool, outcome: Outcome) -> Outcome:
        """Hit, local load, or admission + transfer (+ load), recorded in `outcome` as it goes.

        The caller holds exclusive access. If a step fails, `outcome` says what happened up to it.
        """
        name = model.name
        started = time.perf_counter()
        with self._policy_lock:
            hit = self.policy.touch(name)
        outcome.decision_ms += (time.perf_counter() - started) * 1000
        if hit and self._admitted_sha.get(name) != model.sha256:
            # The store's file changed since the worker got its copy: the copy is stale.
            log.info("[swap] %s changed in the store since it was sent; replacing the worker's copy", name)
            self._forget_on_worker(name)
            hit = False
        if hit and (self._loaded == name or not load):
            outcome.action = "already_loaded" if load else "already_cached"
            return outcome
        if hit:
            outcome.action = "load_from_local_store"
            worker_started = time.perf_counter()
            try:
                self._load(name)
                return outcome
            except ApiError as err:
                if err.code == "load_failed":  # a file the worker cannot load must not keep a slot
                    self._forget_on_worker(name)
                if err.code != "model_not_cached":
                    raise
                log.warning("[swap] %s vanished from the worker's disk; sending it again", name)
                with self._policy_lock:
                    self.policy.discard(name)
            finally:
                outcome.worker_ms += (time.perf_counter() - worker_started) * 1000
        return self._admit_and_send(model, load, outcome)

    def _admit_and_send(self, model: StoredModel, load: bool, outcome: Outcome) -> Outcome:
        name = model.name
        started = time.perf_counter()
        with self._policy_lock:
            try:
                admission = self.policy.admit(name, model.size)
            except (CacheFull, TooLargeForCache) as err:
                outcome.action = "rejected"
                outcome.decision_ms += (time.perf_counter() - started) * 1000
                if isinstance(err, TooLargeForCache):
                    raise ApiError(413, "model_too_large", str(err)) from None
                self.metrics.requests.labels("rejected").inc()
                raise ApiError(503, "cache_full", f"{name} not admitted: {err}") from None
        outcome.decision_ms += (time.perf_counter() - started) * 1000
        outcome.action = "load_from_store" if load else "cached"
        worker_started = time.perf_counter()
        try:
            return self._send_and_load(model, load, admission.evicted, outcome)
        finally:
            outcome.worker_ms += (time.perf_counter() - worker_started) * 1000

    def _send_and_load(self, model: StoredModel, load: bool, evicted: tuple[str, ...], outcome: Outcome) -> Outcome:
        """Carry out an admission: evict, then reuse an expired copy or send the bytes, then load."""
        name = model.name
        # An expired entry comes back as its own victim: its file is still on the worker, so
        # keep it and use it rather than deleting and sending the same bytes again.
        victims = tuple(v for v in evicted if v != name)
        try:
            self._evict(victims, outcome)
            expired_copy = name in evicted and self._admitted_sha.get(name) == model.sha256
            if name in evicted and not expired_copy:
                self._evict((name,))  # an expired copy of an older version of the file: replace it
            reused = self._reuse_expired_copy(name, load) if expired_copy else None
            if reused:
                outcome.action = reused
                return outcome
            outcome.transport = self.transport.name
            sent = self.transport.send(model)
        except BaseException:
            with self._policy_lock:
                self.policy.discard(name)
            self._stale = True
            raise
        outcome.transport = sent.transport
        self._admitted_sha[name] = model.sha256
        self.metrics.bytes_sent.labels(sent.transport).inc(model.size)
        self.metrics.transfer_seconds.labels(sent.transport).observe(sent.seconds)
        log.info("[swap] sent %s (%d bytes) over %s in %.1fms (%.2f GB/s)", name, model.size, sent.transport,
                 sent.seconds * 1000, model.size / sent.seconds / 1e9 if sent.seconds else 0.0)
        if load:
            try:
                self._load(name)
            except ApiError as err:
                if err.code == "load_failed":  # a file the worker cannot load is no use cached
                    self._forget_on_worker(name)
                raise
        return outcome

    def _reuse_expired_copy(self, name: str, load: bool) -> str | None:
        """Use the worker's copy of an expired model; return the action, or None if the worker lost it."""
        if not load:
            return "already_cached"
        if self._loaded == name:
            return "already_loaded"
        try:
            self._load(name)
        except ApiError as err:
            if err.code == "load_failed":
                self._forget_on_worker(name)
            if err.code != "model_not_cached":
                raise
            return None
        return "load_from_local_store"

    def _load(self, name: str) -> None:
        started = time.perf_counter()
        previous, self._loaded = self._loaded, None  # until the worker confirms, we do not know
        try:
            if previous is not None and previous != name:
                # The worker keeps models side by side; the store still holds one at a time.
                self.worker.unload(previous)
            self.worker.load_local(name)
        except ApiError:
            self._stale = True  # a failed load may have restored the previous model: ask the worker
            raise
        self._loaded = name
        seconds = time.perf_counter() - started
        self.metrics.load_seconds.observe(seconds)
        log.info("[swap] loaded %s on the worker in %.1fms", name, seconds * 1000)

    def _evict(self, victims: tuple[str, ...], outcome: Outcome | None = None) -> None:
        for victim in victims:
            started = time.perf_counter()
            self.worker.delete(victim)
            if outcome is not None:
                outcome.evicted += (victim,)
            self._admitted_sha.pop(victim, None)
            if self._loaded == victim:
                self._loaded = None
            self.metrics.evictions.inc()
            log.info("[swap] evicted %s from the worker in %.1fms", victim, (time.perf_counter() - started) * 1000)

    def _forget_on_worker(self, name: str) -> None:
        with self._policy_lock:
            self.policy.discard(name)
        self._admitted_sha.pop(name, None)
        if self._loaded == name:
            self._loaded = None
        try:
            self.worker.delete(name)
        except ApiError:
            self._stale = True

    def _reconcile(self) -> None:
        """Adopt the worker's files that match ours (name and sha256); delete the rest there."""
        state = self.worker.state()
        self._boot_id = state.boot_id
        adopted: list[str] = []
        removed: list[str] = []
        with self._policy_lock:
            self.policy.clear()
        self._admitted_sha.clear()
        for entry in _valid_entries(state.cached, "reconcile"):  # oldest use first: recency survives
            name = entry["name"]
            ours, reason = self._our_copy(name, entry.get("sha256"))
            if ours is None:
                self._delete_quietly(name, reason, removed)
                continue
            try:
                with self._policy_lock:
                    admission = self.policy.admit(name, ours.size)
            except (CacheFull, TooLargeForCache):
                self._delete_quietly(name, f"the {self.policy.name} policy has no room for it", removed)
                continue
            for victim in admission.evicted:
                log.warning("[reconcile] deleting %s on the worker: the %s policy evicts it to keep %s",
                            victim, self.policy.name, name)
            self._evict(admission.evicted)
            removed.extend(admission.evicted)
            adopted.append(name)
            self._admitted_sha[name] = ours.sha256
        with self._policy_lock:
            kept = set(self.policy.entries())
        resident = [name for name in state.loaded if name in kept]  # the others' files were deleted
        self._loaded = resident[-1] if resident else None
        for name in resident[:-1]:  # the store holds one model at a time: keep the latest loaded
            self.worker.unload(name)
        self._stale = False
        self.last_reconciled = Outcome("reconciled", tuple(removed), cached=adopted)
        log.info("[reconcile] adopted=[%s] removed=[%s] loaded=%s", ", ".join(adopted), ", ".join(removed),
                 self._loaded)

    def _our_copy(self, name: str, sha256: str | None) -> tuple[StoredModel | None, str]:
        """The store's copy of a file the worker has, or None and why the worker's copy must go."""
        if not self.catalog.has(name):
            return None, f"not in MODELS_DIR ({self.catalog.root})"
        try:
            ours = self.catalog.get(name)
        except ApiError as err:
            return None, f"not usable in MODELS_DIR ({err.code})"
        if ours.sha256 != sha256:
            return None, "its bytes differ from the copy in MODELS_DIR (sha256)"
        return ours, ""

    def _delete_quietly(self, name: str, reason: str, removed: list[str]) -> None:
        """Delete a file on the worker, saying why at WARNING; only an unreachable worker stops the caller."""
        log.warning("[reconcile] deleting %s on the worker: %s", name, reason)
        try:
            self.worker.delete(name)
            removed.append(name)
        except ApiError as err:
            if err.code == "worker_unavailable":
                raise
            log.warning("[reconcile] could not delete %s on the worker: %s", name, err.message)

    def run_exclusive(self, action: Callable[[], Outcome]) -> Outcome:
        """Run an admin action with exclusive access to the worker."""
        self.scheduler.acquire(None)
        try:
            self._check_worker_boot(None)
            if self._stale:
                self._reconcile()
            return action()
        except ApiError as err:
            if err.code in STALE_CODES:
                self._stale = True
            raise
        finally:
            self.scheduler.release_exclusive()

    def prefetch(self, name: str) -> Outcome:
        """Put a model into the worker's cache without loading it."""
        model = self.catalog.get(name)
        outcome = self.run_exclusive(lambda: self._bring(model, False, Outcome()))
        outcome.cached = self.cached()
        return outcome

    def reset(self) -> Outcome:
        """Unload and delete everything on the worker and empty the policy."""

        def _wipe() -> Outcome:
            self.worker.unload()
            self._loaded = None
            deleted: list[str] = []
            for entry in _valid_entries(self.worker_state().cached, "reset"):
                self._delete_quietly(entry["name"], "POST /admin/reset", deleted)
            with self._policy_lock:
                self.policy.clear()
            self._admitted_sha.clear()
            self._stale = False
            log.info("[reset] worker cache emptied: [%s]", ", ".join(deleted))
            return Outcome("reset", tuple(deleted))

        return self.run_exclusive(_wipe)

    def reconcile(self) -> Outcome:
        """Read the worker's state now (at start-up); the outcome lists what was deleted, and cached what was kept."""
        self._stale = True
        self.run_exclusive(lambda: Outcome("reconciled"))
        return self.last_reconciled
