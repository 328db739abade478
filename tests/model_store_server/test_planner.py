"""The planner as tables: (request, belief snapshot) -> plan, in both tiers. Pure: no worker, no clock."""

from __future__ import annotations

import pytest

from model_store_server.planner import HIT, LOAD_LOCAL, TRANSFER, Resident, Snapshot, Want, plan
from model_store_server.policy import build_policy

MB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def snapshot(cached=(), resident=(), policy="lru", max_cache=2, max_loaded=1, budget=None, used=None, busy=(),
             draining=(), pinned=(), sizes=None, sha=None, clock=None, ttl=5.0, need=None) -> Snapshot:
    """A belief: `cached` in LRU order (oldest first), `resident` in LRU order, each model 100 MB."""
    clock = clock or Clock()
    p = build_policy(policy, max_cache, None, ttl, timer=clock)
    sizes = sizes or {}
    for name in cached:
        p.admit(name, sizes.get(name, 100 * MB))
    shas = {name: f"sha-{name}" for name in cached}
    shas.update(sha or {})
    res = {name: Resident(sizes.get(name, 100 * MB), float(i)) for i, name in enumerate(resident)}
    return Snapshot(p, shas, res, dict(need or {}), budget, used, max_loaded, frozenset(pinned), frozenset(busy),
                    frozenset(draining))


def want(name, size=100 * MB):
    return Want(name, size, f"sha-{name}")


# (what the request is for, the belief) -> (action, disk evictions, unloads, waits, refusal code)
TABLE = [
    ("hit: resident", "a", dict(cached=["a"], resident=["a"]), (HIT, (), (), (), None)),
    ("on disk, memory empty", "a", dict(cached=["a"]), (LOAD_LOCAL, (), (), (), None)),
    ("miss, room on disk and in memory", "b", dict(cached=["a"], max_loaded=2), (TRANSFER, (), (), (), None)),
    ("miss, one model in memory: it is unloaded", "b", dict(cached=["a"], resident=["a"]),
     (TRANSFER, (), ("a",), (), None)),
    ("disk full: the LRU file goes, the resident one is unloaded with it", "c",
     dict(cached=["a", "b"], resident=["a"], max_loaded=2), (TRANSFER, ("a",), (), (), None)),
    ("memory for two: the LRU idle one goes", "c", dict(cached=["a", "b", "c"], resident=["a", "b"], max_loaded=2,
                                                       max_cache=3), (LOAD_LOCAL, (), ("a",), (), None)),
    ("memory for two, LRU one busy: the idle one goes instead", "c",
     dict(cached=["a", "b", "c"], resident=["a", "b"], max_loaded=2, max_cache=3, busy=["a"]),
     (LOAD_LOCAL, (), ("b",), (), None)),
    ("all busy: wait for the LRU one to drain", "c",
     dict(cached=["a", "b", "c"], resident=["a", "b"], max_loaded=2, max_cache=3, busy=["a", "b"]),
     (LOAD_LOCAL, (), (), ("a",), None)),
    ("all busy, one already draining: that one, not the LRU", "c",
     dict(cached=["a", "b", "c"], resident=["a", "b"], max_loaded=2, max_cache=3, busy=["a", "b"], draining=["b"]),
     (LOAD_LOCAL, (), (), ("b",), None)),
    ("pinned LRU stays: the next one goes", "c",
     dict(cached=["a", "b", "c"], resident=["a", "b"], max_loaded=2, max_cache=3, pinned=["a"]),
     (LOAD_LOCAL, (), ("b",), (), None)),
    ("only pinned models in memory: refused", "b",
     dict(cached=["a", "b"], resident=["a"], max_loaded=1, pinned=["a"]), (LOAD_LOCAL, (), (), (), "insufficient_memory")),
    ("pinned file is never the disk victim", "c", dict(cached=["a", "b"], pinned=["a"]),
     (TRANSFER, ("b",), (), (), None)),
    ("no-evict and full: refused, nothing moves", "c", dict(cached=["a", "b"], policy="no-evict"),
     (TRANSFER, (), (), (), "cache_full")),
    ("bytes: room for two 100 MB models, a third needs one out", "c",
     dict(cached=["a", "b", "c"], resident=["a", "b"], max_loaded=5, max_cache=3, budget=250 * MB, used=200 * MB),
     (LOAD_LOCAL, (), ("a",), (), None)),
    ("bytes: a model bigger than what two free makes both go", "c",
     dict(cached=["a", "b", "c"], resident=["a", "b"], max_loaded=5, max_cache=3, budget=300 * MB, used=200 * MB,
          need={"c": 250 * MB}), (LOAD_LOCAL, (), ("a", "b"), (), None)),
    ("bytes: bigger than the whole budget: refused", "c",
     dict(cached=["a", "b", "c"], resident=["a"], max_loaded=5, max_cache=3, budget=300 * MB, used=100 * MB,
          need={"c": 400 * MB}), (LOAD_LOCAL, (), (), (), "insufficient_memory")),
    ("a learned need wins over the file size", "c",
     dict(cached=["a", "c"], resident=["a"], max_loaded=5, max_cache=3, budget=250 * MB, used=100 * MB,
          need={"c": 200 * MB}), (LOAD_LOCAL, (), ("a",), (), None)),
    ("a resident model's memory unknown: unload it and let the worker judge", "b",
     dict(cached=["a", "b"], resident=["a"], max_loaded=5, budget=150 * MB, used=100 * MB, sizes={"a": 0}),
     (LOAD_LOCAL, (), ("a",), (), None)),
    ("the store's file changed: replace the worker's copy", "a",
     dict(cached=["a"], resident=["a"], sha={"a": "old"}), (TRANSFER, (), (), (), None)),
]


@pytest.mark.parametrize("label,name,belief,expected", TABLE, ids=[row[0] for row in TABLE])
def test_plan_table(label, name, belief, expected):
    p = plan(want(name), snapshot(**belief))
    refusal = p.refusal.code if p.refusal else None
    got = (p.action, p.disk.evict, p.memory.unload, p.memory.wait_for, refusal)
    assert got == expected


def test_replacing_a_resident_copy_deletes_it_and_frees_its_memory():
    p = plan(want("a"), snapshot(cached=["a"], resident=["a"], sha={"a": "old"}))
    assert p.disk.replace and p.deleted == ("a",)
    assert p.memory.unload == () and p.memory.wait_for == ()  # its own memory comes back with it


def test_a_replaced_copy_gives_its_memory_back_once():
    # 300 MB budget, a (100) and b (100) resident: replacing a frees 100, so a 150 MB new a needs b gone.
    snap = snapshot(cached=["a", "b"], resident=["a", "b"], max_loaded=5, budget=300 * MB, used=200 * MB,
                    sha={"a": "old"})
    p = plan(want("a", 150 * MB), snap)
    assert (p.action, p.deleted, p.memory.unload) == (TRANSFER, ("a",), ())
    p = plan(want("a", 250 * MB), snap)
    assert p.memory.unload == ("b",)


def test_plan_does_not_change_the_snapshot():
    snap = snapshot(cached=["a", "b"], resident=["a"])
    before = snap.policy.entries()
    plan(want("c"), snap)
    assert snap.policy.entries() == before


def test_expired_copy_is_reused_not_sent_again():
    clock = Clock()
    snap = snapshot(cached=["a", "b"], policy="ttl", clock=clock)
    clock.now += 10  # both expired; their files are still on the worker
    p = plan(want("a"), snap)
    assert (p.action, p.disk.on_disk, p.disk.evict) == (LOAD_LOCAL, True, ("b",))


def test_expired_copy_of_another_version_is_replaced():
    clock = Clock()
    snap = snapshot(cached=["a"], policy="ttl", clock=clock, sha={"a": "old"})
    clock.now += 10
    p = plan(want("a"), snap)
    assert (p.action, p.disk.replace) == (TRANSFER, True)


def test_too_large_for_the_byte_bound_is_refused():
    snap = Snapshot(build_policy("lru", 2, 50 * MB, None), {}, {}, max_loaded=1)
    assert plan(want("a"), snap).refusal.code == "model_too_large"


@pytest.mark.parametrize("policy", ["lru", "lru-ttl", "ttl", "no-evict"])
def test_disk_tier_decides_as_the_policy_alone(policy):
    """The planner adds nothing to the disk policy's choice when nothing is pinned."""
    clock = Clock()
    snap = snapshot(cached=["a", "b"], policy=policy, clock=clock, max_loaded=3)
    expected_policy = build_policy(policy, 2, None, 5.0, timer=clock)
    for name in ("a", "b"):
        expected_policy.admit(name, 100 * MB)
    try:
        expected = expected_policy.admit("c", 100 * MB).evicted
    except Exception:
        expected = None
    p = plan(want("c"), snap)
    assert (p.disk.evict if p.refusal is None else None) == expected
