"""The store's belief about one worker: which files are on its disk and which models in its memory.

`WorkerBelief` is the only writer of that belief. It does no I/O: the executor tells it what
happened (a load, an unload, a transfer, an error) and what the worker reported (`observe`).
Its lock is never held while anything else is waited for.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from model_store_server.catalog import StoredModel
from model_store_server.planner import DiskPlan, Resident, Snapshot, Want, decide_disk
from model_store_server.policy import CacheFull, CachePolicy, TooLargeForCache
from model_store_server.worker_client import WorkerState
from model_swap.errors import ApiError
from model_swap.names import check_model_name

log = logging.getLogger(__name__)
# Worker errors after which the store's belief may be wrong: read the worker before the next change.
STALE_CODES = frozenset({"worker_unavailable", "worker_error", "model_not_loaded", "model_unloading",
                         "load_failed", "model_not_cached"})


@dataclass
class ResidentRecord:
    """One model in the worker's memory: its size, when it was last used and how long it may idle."""

    name: str
    memory_bytes: int | None
    chosen_at: float  # when it was loaded or last switched to: the newest is the "active" model
    last_used: float
    keep_alive_s: float  # < 0: never unloaded for idling
    slots: int = 1  # generations the worker runs at once for it, as its listing says (N_PARALLEL)

    def expires_at(self) -> float | None:
        return None if self.keep_alive_s < 0 else self.last_used + self.keep_alive_s


@dataclass
class Operation:
    """A transfer or a load in flight, for /models and progress reports."""

    model: str
    op: str
    bytes_total: int
    bytes_done: int
    started: float


@dataclass(frozen=True)
class Reconciliation:
    """What observe() found when the worker differed from the belief: files to delete there, and why."""

    adopted: tuple[str, ...]
    strays: tuple[tuple[str, str], ...]  # (name, why it must go)
    restarted: bool


def valid_entries(entries: list[dict], context: str) -> Iterator[dict]:
    """The worker's listing entries whose names pass the name check; the rest are logged and skipped."""
    for entry in entries:
        try:
            check_model_name(entry.get("name"))
        except ApiError:
            log.warning("[%s] ignoring a worker entry with an invalid name: %r", context, entry.get("name"))
            continue
        yield entry


class WorkerBelief:
    """What the store believes one worker holds, on disk (the cache policy) and in memory."""

    def __init__(self, policy: CachePolicy, pinned: frozenset[str] = frozenset(), keep_alive_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic):
        self._lock = threading.Lock()
        self._clock = clock
        self._policy = policy
        self.pinned = frozenset(pinned)
        self.default_keep_alive_s = keep_alive_s
        self._admitted_sha: dict[str, str] = {}  # digest of the copy each cached model has on the worker
        self._resident: dict[str, ResidentRecord] = {}
        self._need: dict[str, int] = {}  # memory each model needed when last loaded (or at least)
        self._budget: int | None = None
        self._used: int | None = None
        self._max_loaded = 1
        self._boot_id: str | None = None
        self._stale = True  # read the worker before the next change
        self._ops: dict[str, Operation] = {}

    # ---- reading -------------------------------------------------------------------------

    @property
    def stale(self) -> bool:
        return self._stale

    @property
    def policy_name(self) -> str:
        return self._policy.name

    @property
    def timed(self) -> bool:
        return self._policy.timed

    def snapshot(self, busy: frozenset[str] = frozenset(), draining: frozenset[str] = frozenset()) -> Snapshot:
        """A copy for the planner, with the gates' busy and draining models."""
        with self._lock:
            return Snapshot(self._policy.copy(), dict(self._admitted_sha),
                            {n: Resident(r.memory_bytes, r.last_used) for n, r in self._resident.items()},
                            dict(self._need), self._budget, self._used, self._max_loaded, self.pinned,
                            frozenset(busy), frozenset(draining))

    def cached(self) -> list[str]:
        """Files on the worker's disk, next disk victim first."""
        with self._lock:
            return self._policy.entries()

    def resident(self) -> list[str]:
        """Models in the worker's memory, least recently used first."""
        with self._lock:
            return [r.name for r in sorted(self._resident.values(), key=lambda r: r.last_used)]

    def slots(self) -> dict[str, int]:
        """Per resident model, how many generations the worker runs at once (1 until its listing says)."""
        with self._lock:
            return {name: r.slots for name, r in self._resident.items()}

    def active(self) -> str | None:
        """The model loaded or switched to most recently, or None when none is resident."""
        with self._lock:
            # Reversed: models adopted together (same chosen_at) are in the worker's load order; the last wins.
            newest = max(reversed(list(self._resident.values())), key=lambda r: r.chosen_at, default=None)
            return None if newest is None else newest.name

    def chosen(self, name: str) -> None:
        """`name` was switched to: if it is resident, it becomes the active model, as if loaded now."""
        now = self._clock()
        with self._lock:
            record = self._resident.pop(name, None)
            if record is not None:
                record.chosen_at = now
                self._resident[name] = record  # last in order too, so a tie on the clock goes to it

    def has_copy(self, name: str, sha256: str) -> bool:
        """Whether the worker's copy of `name` is the store's current file."""
        with self._lock:
            return self._admitted_sha.get(name) == sha256

    def is_resident(self, name: str) -> bool:
        with self._lock:
            return name in self._resident

    def in_flight(self) -> list[str]:
        """Models being transferred or loaded now."""
        with self._lock:
            return list(self._ops)

    def progress_of(self, name: str) -> Operation | None:
        with self._lock:
            op = self._ops.get(name)
            return None if op is None else Operation(op.model, op.op, op.bytes_total, op.bytes_done, op.started)

    def expired_idle(self, busy: frozenset[str]) -> list[str]:
        """Idle, unpinned models whose keep-alive has run out."""
        now = self._clock()
        with self._lock:
            return [r.name for r in self._resident.values()
                    if r.name not in busy and r.name not in self.pinned
                    and (at := r.expires_at()) is not None and at <= now]

    def next_expiry(self, busy: frozenset[str]) -> float | None:
        """When the next idle model's keep-alive runs out (clock time), if any."""
        with self._lock:
            times = [at for r in self._resident.values()
                     if r.name not in busy and r.name not in self.pinned and (at := r.expires_at()) is not None]
        return min(times, default=None)

    def expires_at(self, name: str, busy: bool = False) -> float | None:
        """When `name` leaves the worker by itself (clock time): a resident model when its keep-alive runs out
        (None while busy, pinned or kept forever), a file on the disk only when a timed policy expires it."""
        with self._lock:
            record = self._resident.get(name)
            if record is not None:
                return None if busy or name in self.pinned else record.expires_at()
            return None if name in self.pinned else self._policy.expires_at(name)

    def expired_files(self) -> list[str]:
        """Files a timed policy has expired (pinned ones are kept fresh instead)."""
        with self._lock:
            for name in self.pinned:
                self._policy.touch(name)
            return [n for n in self._policy.expired() if n not in self.pinned]

    def view(self, busy: dict[str, int] | None = None) -> dict:
        """The belief for GET /models."""
        now = self._clock()
        busy = busy or {}
        with self._lock:
            loaded = [{"name": r.name, "memory_bytes": r.memory_bytes, "idle_s": round(now - r.last_used, 3),
                       "keep_alive_s": r.keep_alive_s, "pinned": r.name in self.pinned,
                       "expires_in_s": None if (at := r.expires_at()) is None or r.name in self.pinned
                       or busy.get(r.name) else round(max(0.0, at - now), 3)}
                      for r in sorted(self._resident.values(), key=lambda r: r.last_used)]
            in_flight = [{"model": op.model, "op": op.op, "bytes_done": op.bytes_done,
                          "bytes_total": op.bytes_total, "seconds": round(now - op.started, 3)}
                         for op in self._ops.values()]
            return {"cached": self._policy.entries(), "loaded": loaded, "in_flight": in_flight,
                    "memory": {"budget_bytes": self._budget, "used_bytes": self._used,
                               "max_loaded_models": self._max_loaded},
                    "boot_id": self._boot_id, "stale": self._stale}

    # ---- writing: what the worker reported ---------------------------------------------

    def observe(self, state: WorkerState,
                lookup: Callable[[str], tuple[StoredModel | None, str]]) -> Reconciliation | None:
        """Take in the worker's listing; rebuild from it (and return the strays) if it differs.

        A changed boot id (the worker restarted), an earlier error, or a disk or memory that
        is not what we believe all mean: adopt the worker's files that match the store's
        (name and sha256, oldest use first so recency survives), and delete the rest there.
        `lookup` finds the store's copy of a file (or says why there is none); it is called
        without the lock held."""
        entries = list(valid_entries(state.cached, "reconcile"))
        with self._lock:
            restarted = bool(self._boot_id and state.boot_id and state.boot_id != self._boot_id)
            self._boot_id = state.boot_id or self._boot_id
            self._budget, self._used, self._max_loaded = state.budget_bytes, state.used_bytes, state.max_loaded_models
            same = (not self._stale and not restarted
                    and {e["name"]: e.get("sha256") for e in entries} == self._admitted_sha
                    and set(self._policy.entries()) == set(self._admitted_sha)
                    and set(state.loaded_names) == set(self._resident))
            if same:
                self._learn_memory(state)
                return None
        ours = {e["name"]: lookup(e["name"]) for e in entries}
        with self._lock:
            return self._rebuild(state, entries, ours, restarted)

    def _rebuild(self, state: WorkerState, entries: list[dict], ours: dict[str, tuple[StoredModel | None, str]],
                 restarted: bool) -> Reconciliation:
        self._policy.clear()
        self._admitted_sha.clear()
        adopted: list[str] = []
        strays: list[tuple[str, str]] = []
        for entry in entries:
            name, (mine, why_not) = entry["name"], ours[entry["name"]]
            if mine is None:
                strays.append((name, why_not))
                continue
            if mine.sha256 != entry.get("sha256"):
                strays.append((name, "its bytes differ from the copy in MODELS_DIR (sha256)"))
                continue
            try:
                admission = self._policy.admit(name, mine.size)
            except (CacheFull, TooLargeForCache):
                strays.append((name, f"the {self._policy.name} policy has no room for it"))
                continue
            for victim in admission.evicted:
                strays.append((victim, f"the {self._policy.name} policy evicts it to keep {name}"))
                self._admitted_sha.pop(victim, None)
                if victim in adopted:
                    adopted.remove(victim)
            adopted.append(name)
            self._admitted_sha[name] = mine.sha256
        now = self._clock()
        kept = set(self._policy.entries())
        resident = {}
        for model in state.loaded:
            if model.name in kept:
                old = self._resident.get(model.name)
                resident[model.name] = old or ResidentRecord(model.name, None, now, now, self.default_keep_alive_s)
        self._resident = resident
        self._learn_memory(state)
        self._stale = False
        return Reconciliation(tuple(adopted), tuple(strays), restarted)

    def _learn_memory(self, state: WorkerState) -> None:
        """What the worker's listing says of its models: memory taken, and slots."""
        for model in state.loaded:
            record = self._resident.get(model.name)
            if record is not None:
                record.slots = model.n_parallel
            measured = max(model.memory_bytes or 0, model.estimated_bytes or 0)
            if measured and record is not None:
                record.memory_bytes = measured
                self._need[model.name] = measured

    def on_worker_error(self, err: ApiError) -> bool:
        """The one place a worker error reaches the belief: after some, it must be read again."""
        if err.code in STALE_CODES:
            with self._lock:
                self._stale = True
            return True
        return False

    def mark_stale(self) -> None:
        with self._lock:
            self._stale = True

    # ---- writing: what the executor did -------------------------------------------------

    def commit_disk(self, want: Want, expected: DiskPlan) -> bool:
        """Apply a disk plan to the policy if deciding again now gives the same plan; else change nothing."""
        with self._lock:
            trial = self._policy.copy()
            if decide_disk(want, trial, self._admitted_sha, self.pinned) != expected:
                return False
            self._policy = trial
            for name in expected.evict + ((want.name,) if expected.replace else ()):
                self._admitted_sha.pop(name, None)
            if expected.replace:
                self._need.pop(want.name, None)  # measured for the old version of the file
            return True

    def note_use(self, name: str, keep_alive_s: float | None = None) -> None:
        """A request started or ended on `name`: recency in both tiers, and its keep-alive from now."""
        now = self._clock()
        with self._lock:
            self._policy.use(name)
            record = self._resident.get(name)
            if record is not None:
                record.last_used = now
                if keep_alive_s is not None:
                    record.keep_alive_s = keep_alive_s

    def admitted(self, name: str, sha256: str) -> None:
        """The worker has the store's copy of `name` now."""
        with self._lock:
            self._admitted_sha[name] = sha256

    def forget_file(self, name: str) -> None:
        """`name` is gone from the worker's disk (evicted, swept, failed, vanished): and from its memory."""
        with self._lock:
            self._policy.discard(name)
            self._admitted_sha.pop(name, None)
            self._drop_resident(name)

    def loaded(self, name: str, keep_alive_s: float | None = None, memory_bytes: int | None = None) -> None:
        now = self._clock()
        with self._lock:
            self._resident[name] = ResidentRecord(name, memory_bytes or self._need.get(name), now, now,
                                                  self.default_keep_alive_s if keep_alive_s is None else keep_alive_s)

    def unloaded(self, name: str) -> None:
        with self._lock:
            self._drop_resident(name)

    def _drop_resident(self, name: str) -> None:
        record = self._resident.pop(name, None)
        if record is not None and self._used is not None and record.memory_bytes:
            self._used = max(0, self._used - record.memory_bytes)

    def learn_need(self, name: str, at_least: int) -> None:
        """The worker refused to load `name` for memory: it needs more than we thought."""
        with self._lock:
            self._need[name] = max(self._need.get(name, 0), at_least)

    def cleared(self) -> None:
        """Everything on the worker was unloaded and deleted (admin reset)."""
        with self._lock:
            self._policy.clear()
            self._admitted_sha.clear()
            self._resident.clear()
            self._used = 0 if self._used is not None else None

    # ---- operations in flight -----------------------------------------------------------

    def begin_op(self, name: str, op: str, total: int) -> None:
        with self._lock:
            self._ops[name] = Operation(name, op, total, 0, self._clock())

    def progress(self, name: str, done: int) -> None:
        with self._lock:
            if name in self._ops:
                self._ops[name].bytes_done = done

    def end_op(self, name: str) -> None:
        with self._lock:
            self._ops.pop(name, None)
