"""placement.place by tables: a pure function over every worker's belief and measurements."""

from __future__ import annotations

import pytest

from model_store_server.placement import (CHEAPEST, INCOMING, ON_DISK, REPLICA, RESIDENT, WorkerFacts, place,
                                          start_cost)
from model_store_server.planner import Resident, Snapshot, Want
from model_store_server.policy import build_policy

MB = 1 << 20
WANT = Want("m.gguf", 100 * MB, "sha-m")
SIZES = {"m.gguf": 100 * MB, "x.gguf": 100 * MB, "y.gguf": 100 * MB}


def worker(name, cached=(), resident=(), busy=(), max_loaded=1, up=True, uses=None, incoming=(), rate=None,
           load_s=None, generation_s=None, lane_queue=0, max_cache=3, slots=None):
    """A worker's facts: files `cached` (the store's copies), models `resident`, `busy` ones in use."""
    policy = build_policy("lru", max_cache, None, None)
    for n in cached:
        policy.admit(n, SIZES[n])
    snap = Snapshot(policy, {n: f"sha-{n.split('.')[0]}" for n in cached},
                    {n: Resident(SIZES[n], float(i)) for i, n in enumerate(resident)}, max_loaded=max_loaded,
                    busy=frozenset(busy))
    return WorkerFacts(name, snap, up, uses or {n: 1 for n in busy}, frozenset(incoming), lane_queue, rate,
                       load_s or {}, generation_s or {}, slots or {})


CASES = {
    # (workers, max_replicas) -> (worker, rule)
    "resident wins over an empty worker": (
        [worker("w1"), worker("w2", cached=["m.gguf"], resident=["m.gguf"])], ("w2", RESIDENT)),
    "least loaded of two copies": (
        [worker("w1", cached=["m.gguf"], resident=["m.gguf"], max_loaded=2, uses={"m.gguf": 3}),
         worker("w2", cached=["m.gguf"], resident=["m.gguf"], max_loaded=2, uses={"m.gguf": 1})], ("w2", RESIDENT)),
    "a down worker is skipped even with the model": (
        [worker("w1", cached=["m.gguf"], resident=["m.gguf"], up=False), worker("w2")], ("w2", CHEAPEST)),
    "a worker bringing it in gets the next requests too": (
        [worker("w1"), worker("w2", incoming=["m.gguf"])], ("w2", INCOMING)),
    "on disk and memory free beats an empty worker": (
        [worker("w1"), worker("w2", cached=["m.gguf"])], ("w2", ON_DISK)),
    "on disk but its memory holds a busy model: not rule 2": (
        [worker("w1", cached=["x.gguf", "m.gguf"], resident=["x.gguf"], busy=["x.gguf"]), worker("w2")],
        ("w2", CHEAPEST)),
    "cheapest start: an idle empty worker over one that must evict": (
        [worker("w1", cached=["x.gguf"], resident=["x.gguf"], load_s={"x.gguf": 1.0}), worker("w2")],
        ("w2", CHEAPEST)),
    "cheapest start: a faster link wins": (
        [worker("w1", rate=1e8), worker("w2", rate=1e10)], ("w2", CHEAPEST)),
    "cheapest start: a long lane queue loses": (
        [worker("w1", lane_queue=5), worker("w2")], ("w2", CHEAPEST)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_placement_rules(case):
    workers, (name, rule) = CASES[case]
    chosen = place(WANT, workers)
    assert (chosen.worker, chosen.rule) == (name, rule)


def test_no_worker_up_places_nothing():
    assert place(WANT, [worker("w1", up=False), worker("w2", up=False)]) is None


def test_a_queue_longer_than_a_start_elsewhere_places_a_replica():
    hot = worker("w1", cached=["m.gguf"], resident=["m.gguf"], uses={"m.gguf": 8}, generation_s={"m.gguf": 1.0})
    chosen = place(WANT, [hot, worker("w2"), worker("w3", cached=["x.gguf"], resident=["x.gguf"])])
    assert (chosen.worker, chosen.rule) == ("w2", REPLICA)
    assert 0 < chosen.cost_s < 8.0


def test_a_short_queue_stays_on_the_copy():
    warm = worker("w1", cached=["m.gguf"], resident=["m.gguf"], uses={"m.gguf": 1}, generation_s={"m.gguf": 0.01})
    assert place(WANT, [warm, worker("w2")]).rule == RESIDENT


@pytest.mark.parametrize("uses, slots, expected", [
    (3, 4, RESIDENT),  # a slot is free: no wait, no copy
    (4, 4, REPLICA),   # every slot busy: it waits a round of generations
    (8, 1, REPLICA),   # one slot: it waits for all eight
])
def test_a_worker_with_free_slots_waits_for_nothing(uses, slots, expected):
    hot = worker("w1", cached=["m.gguf"], resident=["m.gguf"], uses={"m.gguf": uses}, generation_s={"m.gguf": 1.0},
                 slots={"m.gguf": slots})
    assert hot.queue_seconds(WANT) == uses // slots * 1.0
    assert place(WANT, [hot, worker("w2")]).rule == expected


@pytest.mark.parametrize("max_replicas, copies, expected", [(2, 2, RESIDENT), (3, 2, REPLICA), (1, 1, RESIDENT)])
def test_replicas_stop_at_the_cap(max_replicas, copies, expected):
    hot = [worker(f"w{i}", cached=["m.gguf"], resident=["m.gguf"], uses={"m.gguf": 8}, generation_s={"m.gguf": 1.0})
           for i in range(copies)]
    assert place(WANT, [*hot, worker("spare")], max_replicas=max_replicas).rule == expected


def test_a_replica_on_its_way_counts_against_the_cap():
    hot = worker("w1", cached=["m.gguf"], resident=["m.gguf"], uses={"m.gguf": 8}, generation_s={"m.gguf": 1.0})
    chosen = place(WANT, [hot, worker("w2", incoming=["m.gguf"]), worker("w3")], max_replicas=2)
    assert (chosen.worker, chosen.rule) == ("w1", RESIDENT)


def test_start_cost_adds_transfer_load_queue_and_evictions():
    base = worker("w", rate=1e8, load_s={"m.gguf": 0.5})
    assert start_cost(WANT, base) == pytest.approx(100 * MB / 1e8 + 0.5)
    queued = worker("w", rate=1e8, load_s={"m.gguf": 0.5}, lane_queue=2)
    assert start_cost(WANT, queued) == pytest.approx(100 * MB / 1e8 + 0.5 + 2 * 0.5)
    evicting = worker("w", cached=["x.gguf"], resident=["x.gguf"], rate=1e8, load_s={"m.gguf": 0.5, "x.gguf": 3.0})
    assert start_cost(WANT, evicting) == pytest.approx(100 * MB / 1e8 + 0.5 + 3.0)
    on_disk = worker("w", cached=["m.gguf"], rate=1e8, load_s={"m.gguf": 0.5})
    assert start_cost(WANT, on_disk) == pytest.approx(0.5)


def test_a_worker_whose_plan_refuses_is_not_chosen():
    too_small = WorkerFacts("w1", Snapshot(build_policy("lru", 1, 10 * MB, None), {}, {}), True)  # 10 MB cache
    assert start_cost(WANT, too_small) is None
    assert place(WANT, [too_small, worker("w2")]).worker == "w2"
