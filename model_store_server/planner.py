"""The store's decision for one request: a pure function of (request, belief snapshot, policies).

No I/O, no logging, no clock: it reads a snapshot and returns a plan; the executor carries it
out. Two tiers: the worker's disk (the cache policy decides, with pinned models protected) and
its memory (least recently used idle models go first; busy models are waited for, never cut
off; pinned models never go).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from model_store_server.policy import Admission, CacheFull, CachePolicy, TooLargeForCache

HIT = "already_loaded"
LOAD_LOCAL = "load_from_local_store"
TRANSFER = "load_from_store"


@dataclass(frozen=True)
class Want:
    """The model a request needs, as the store has it."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Resident:
    """A model the store believes is in the worker's memory."""

    memory_bytes: int | None
    last_used: float


@dataclass(frozen=True)
class Snapshot:
    """What the planner reads: the belief about one worker at one moment, and the request gates' state.

    `policy` must be a copy nobody else changes: the planner only changes copies of it."""

    policy: CachePolicy
    admitted_sha: Mapping[str, str]
    resident: Mapping[str, Resident]
    memory_need: Mapping[str, int] = field(default_factory=dict)
    budget_bytes: int | None = None
    used_bytes: int | None = None
    max_loaded: int = 1
    pinned: frozenset[str] = frozenset()
    busy: frozenset[str] = frozenset()  # models with running or waiting generations
    draining: frozenset[str] = frozenset()  # busy models this change already closed to new requests


@dataclass(frozen=True)
class Refusal:
    """Why the request cannot be served: the HTTP status and error code the store answers."""

    status: int
    code: str
    message: str


@dataclass(frozen=True)
class DiskPlan:
    """The disk tier: is the model's file there, or which files go to make room for it."""

    on_disk: bool  # the worker's copy can be loaded as it is
    evict: tuple[str, ...] = ()  # files to delete first, in order
    replace: bool = False  # the worker's copy is another version of the file: delete it first
    refusal: Refusal | None = None


@dataclass(frozen=True)
class MemoryPlan:
    """The memory tier: which idle models to unload, and which busy ones must drain first."""

    unload: tuple[str, ...] = ()
    wait_for: tuple[str, ...] = ()
    refusal: Refusal | None = None


@dataclass(frozen=True)
class Plan:
    """Both tiers for one request; `action` is the X-Cache-Action it reports."""

    action: str
    disk: DiskPlan
    memory: MemoryPlan
    want: str = ""

    @property
    def refusal(self) -> Refusal | None:
        return self.disk.refusal or self.memory.refusal

    @property
    def deleted(self) -> tuple[str, ...]:
        """The files the disk step deletes on the worker, in order (a replaced copy last)."""
        return self.disk.evict + ((self.want,) if self.disk.replace else ())


def admit(policy: CachePolicy, want: Want, pinned: frozenset[str]) -> Admission:
    """Admit `want` into `policy` (changing it), pinned models kept; raises CacheFull, TooLargeForCache."""
    for name in pinned:  # most recently used: the policy only picks one once no other is left
        policy.touch(name)
    admission = policy.admit(want.name, want.size)
    if pinned.intersection(admission.evicted):
        raise CacheFull(f"the pinned models ({', '.join(sorted(pinned))}) leave no room for {want.name}")
    return admission


def plan_disk(want: Want, snap: Snapshot) -> DiskPlan:
    """Whether the worker's copy of the file serves, or what the policy evicts to admit it."""
    return decide_disk(want, snap.policy.copy(), snap.admitted_sha, snap.pinned)


def decide_disk(want: Want, policy: CachePolicy, admitted_sha: Mapping[str, str],
                pinned: frozenset[str]) -> DiskPlan:
    """plan_disk on a policy it changes: the belief commits a plan by repeating it on a copy of its own."""
    same_copy = admitted_sha.get(want.name) == want.sha256
    hit = policy.touch(want.name)
    if hit and same_copy:
        return DiskPlan(on_disk=True)
    on_worker = hit or want.name in policy.entries()  # a live entry, or an expired one awaiting the sweep
    if hit:
        policy.discard(want.name)  # the store's file changed since the worker got its copy
    try:
        admission = admit(policy, want, pinned)
    except CacheFull as err:
        return DiskPlan(False, refusal=Refusal(503, "cache_full", f"{want.name} not admitted: {err}"))
    except TooLargeForCache as err:
        return DiskPlan(False, refusal=Refusal(413, "model_too_large", str(err)))
    victims = tuple(v for v in admission.evicted if v != want.name)
    # An expired entry comes back as its own victim: its file is still on the worker, so keep
    # it and use it rather than deleting and sending the same bytes again.
    expired_copy = want.name in admission.evicted and same_copy
    return DiskPlan(on_disk=expired_copy, evict=victims, replace=on_worker and not expired_copy)


def memory_of(snap: Snapshot, name: str, size: int | None = None) -> int:
    """The memory a model needs: what the worker measured or estimated, else the file's size."""
    known = snap.resident.get(name)
    if known is not None and known.memory_bytes:
        return known.memory_bytes
    return snap.memory_need.get(name, size or 0)


def plan_memory(want: Want, snap: Snapshot, leaving: tuple[str, ...] = ()) -> MemoryPlan:
    """Room in memory for `want`, given that the models in `leaving` go anyway (disk evictions)."""
    if want.name in snap.resident and want.name not in leaving:
        return MemoryPlan()
    staying = [name for name in snap.resident if name not in leaving and name != want.name]
    freed = sum(memory_of(snap, name) for name in leaving if name in snap.resident)  # want too, if replaced
    # A new version of a file needs what its size says; what the old one measured no longer applies.
    need = want.size if want.name in leaving else memory_of(snap, want.name, want.size)
    free = None
    if snap.budget_bytes is not None:
        used = snap.used_bytes if snap.used_bytes is not None else sum(memory_of(snap, n) for n in snap.resident)
        free = snap.budget_bytes - used + freed

    def fits() -> bool:
        return len(staying) + 1 <= snap.max_loaded and (free is None or need <= free)

    def order(name: str) -> tuple:
        busy = name in snap.busy
        # Idle ones first, least recently used first; of the busy ones, those already draining.
        return (busy, busy and name not in snap.draining, snap.resident[name].last_used, name)

    unload: list[str] = []
    wait_for: list[str] = []
    for name in sorted((n for n in staying if n not in snap.pinned), key=order):
        if fits():
            break
        staying.remove(name)
        if free is not None:
            free += memory_of(snap, name)
        (wait_for if name in snap.busy else unload).append(name)
    # A resident model whose memory was never reported frees an unknown amount: let the worker judge.
    unknown = any(not memory_of(snap, name) for name in snap.resident)
    if not fits() and not (unknown and len(staying) + 1 <= snap.max_loaded):
        held = ", ".join(sorted(snap.pinned & set(staying))) or "none"
        budget = f"{snap.budget_bytes} bytes" if snap.budget_bytes is not None else "no byte budget"
        return MemoryPlan(refusal=Refusal(507, "insufficient_memory",
                                          f"{want.name} needs {need} bytes; the worker holds at most "
                                          f"{snap.max_loaded} models ({budget}) and pinned models stay ({held})"))
    return MemoryPlan(tuple(unload), tuple(wait_for))


def plan(want: Want, snap: Snapshot) -> Plan:
    """Both tiers: hit, load from the worker's disk, or transfer; with the victims in each tier."""
    disk = plan_disk(want, snap)
    if disk.refusal:
        return Plan(TRANSFER, disk, MemoryPlan(), want.name)
    memory = plan_memory(want, snap, disk.evict + ((want.name,) if disk.replace else ()))
    if not disk.on_disk:
        action = TRANSFER
    elif want.name in snap.resident:
        action = HIT
    else:
        action = LOAD_LOCAL
    return Plan(action, disk, memory, want.name)
