"""Which worker a request goes to: a pure function over every worker's belief, and what it measured.

No I/O, no clock, no logging. In order:
1. a worker with the model resident (its current copy), the least loaded of them; unless the
   request would queue there longer than another worker needs to start a copy, and fewer than
   MAX_REPLICAS copies exist or are coming: then that other worker (a *replica*);
2. a worker already bringing the model in (requests wait for it there, not start a second copy);
3. a worker with the file on disk whose memory takes it without unloading a busy model;
4. the worker where starting it costs least: transfer (bytes / its measured rate) + load
   (measured for the model) + the changes queued before it + the cost of what it would evict.
A worker that is down, or whose plan would refuse the model, is not a candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from model_store_server import planner
from model_store_server.planner import LOAD_LOCAL, Snapshot, Want

# Figures to plan with before a worker has measured its own (loopback HTTP and a fast NVMe disk are faster).
DEFAULT_TRANSFER_BYTES_PER_S = 1e9
DEFAULT_LOAD_BYTES_PER_S = 2e9
RESIDENT, REPLICA, INCOMING, ON_DISK, CHEAPEST = "resident", "replica", "incoming", "on_disk", "cheapest_start"


@dataclass(frozen=True)
class WorkerFacts:
    """What placement knows about one worker at one moment."""

    name: str
    snapshot: Snapshot
    up: bool = True
    uses: Mapping[str, int] = field(default_factory=dict)  # running or waiting generations per model
    incoming: frozenset[str] = frozenset()  # models being transferred or loaded, or waited for in its lane
    lane_queue: int = 0  # changes waiting for this worker's lane
    transfer_bytes_per_s: float | None = None  # measured
    load_s: Mapping[str, float] = field(default_factory=dict)  # measured per model
    generation_s: Mapping[str, float] = field(default_factory=dict)  # one generation's time, per model
    slots: Mapping[str, int] = field(default_factory=dict)  # generations run at once, per resident model

    @property
    def load(self) -> int:
        return sum(self.uses.values())

    def holds(self, want: Want) -> bool:
        return want.name in self.snapshot.resident and self.snapshot.admitted_sha.get(want.name) == want.sha256

    def load_seconds(self, name: str, size: int) -> float:
        return self.load_s.get(name, size / DEFAULT_LOAD_BYTES_PER_S)

    def queue_seconds(self, want: Want) -> float:
        """How long a new request for `want` would wait here behind the ones already on it: nothing while
        a slot is free, then a generation's time for each full round of the slots ahead of it."""
        slots = max(1, self.slots.get(want.name, 1))
        return self.uses.get(want.name, 0) // slots * self.generation_s.get(want.name, 0.0)


@dataclass(frozen=True)
class Placement:
    """The chosen worker, the rule that chose it, and the start cost estimated there (0 for a resident copy)."""

    worker: str
    rule: str
    cost_s: float = 0.0


def start_cost(want: Want, facts: WorkerFacts, swap_wait_s: float = 2.0) -> float | None:
    """Seconds until `want` could serve on this worker, or None if its plan refuses the model."""
    snap = facts.snapshot
    plan = planner.plan(want, snap)
    if plan.refusal:
        return None
    size = want.size
    transfer = 0.0 if plan.disk.on_disk else size / (facts.transfer_bytes_per_s or DEFAULT_TRANSFER_BYTES_PER_S)
    load = 0.0 if plan.action == planner.HIT else facts.load_seconds(want.name, size)
    queue = facts.lane_queue * facts.load_seconds(want.name, size)  # each queued change is about a load
    # What it evicts must come back some day: count its load, and the swap bound for a busy one.
    evicted = set(plan.memory.unload) | set(plan.memory.wait_for) | set(plan.deleted)
    evict = sum(facts.load_seconds(name, 0) for name in evicted) + swap_wait_s * len(plan.memory.wait_for)
    return transfer + load + queue + evict


def place(want: Want, workers: Sequence[WorkerFacts], max_replicas: int = 2,
          swap_wait_s: float = 2.0) -> Placement | None:
    """The worker for a request for `want`, or None if no worker is up."""
    up = [w for w in workers if w.up]
    if not up:
        return None
    holders = [w for w in up if w.holds(want)]
    incoming = [w for w in up if want.name in w.incoming and not w.holds(want)]
    if holders:
        best = min(holders, key=lambda w: (w.uses.get(want.name, 0), w.load, w.name))
        waits = best.queue_seconds(want)
        if waits > 0 and len(holders) + len(incoming) < max_replicas:
            costs = [(cost, w.load, w.name) for w in up if w not in holders and w not in incoming
                     and (cost := start_cost(want, w, swap_wait_s)) is not None]
            if costs and min(costs)[0] < waits:
                cost, _, name = min(costs)
                return Placement(name, REPLICA, cost)
        return Placement(best.name, RESIDENT)
    if incoming:
        return Placement(min(incoming, key=lambda w: (w.load, w.name)).name, INCOMING)
    ready = []
    for w in up:
        plan = planner.plan(want, w.snapshot)
        if not plan.refusal and plan.action == LOAD_LOCAL and not plan.memory.wait_for:
            ready.append(w)
    if ready:
        best = min(ready, key=lambda w: (w.load, w.lane_queue, w.name))
        return Placement(best.name, ON_DISK, start_cost(want, best, swap_wait_s) or 0.0)
    costs = [(cost, w.load, w.name) for w in up if (cost := start_cost(want, w, swap_wait_s)) is not None]
    if not costs:
        # Every worker refuses: let the first one that is up say why (its plan's refusal).
        return Placement(up[0].name, CHEAPEST, 0.0)
    cost, _, name = min(costs)
    return Placement(name, CHEAPEST, cost)
