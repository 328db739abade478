"""The scheduler's rules with real threads: arrival order, sharing, drain before a swap."""

from __future__ import annotations

import threading
import time

from model_store_server.scheduler import Scheduler


def _wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def test_first_caller_gets_exclusive_then_others_share():
    s = Scheduler()
    assert s.acquire("a") is True
    joined = []
    t = threading.Thread(target=lambda: joined.append(s.acquire("a")))
    t.start()
    _wait_for(lambda: s.snapshot()["waiting"] == 1)
    assert not joined, "nobody joins while the exclusive holder is changing the worker"
    s.downgrade("a")
    t.join(5)
    assert joined == [False]
    assert s.snapshot()["shared_count"] == 2


def test_swap_waits_for_shared_holders_to_drain():
    s = Scheduler()
    s.acquire("a")
    s.downgrade("a")
    got = []
    t = threading.Thread(target=lambda: got.append(s.acquire("b")))
    t.start()
    _wait_for(lambda: s.snapshot()["waiting"] == 1)
    time.sleep(0.05)
    assert not got
    s.release_shared()
    t.join(5)
    assert got == [True]


def test_request_behind_waiting_swap_does_not_jump_the_queue():
    s = Scheduler()
    s.acquire("a")
    s.downgrade("a")
    order = []

    def want(model):
        exclusive = s.acquire(model)
        order.append(model)
        if exclusive:
            s.downgrade(model)

    tb = threading.Thread(target=want, args=("b",))
    tb.start()
    _wait_for(lambda: s.snapshot()["waiting"] == 1)
    ta = threading.Thread(target=want, args=("a",))
    ta.start()
    _wait_for(lambda: s.snapshot()["waiting"] == 2)
    time.sleep(0.05)
    assert order == [], "the later request for the loaded model waits behind the swap"
    s.release_shared()
    tb.join(5)
    assert order == ["b"]
    s.release_shared()  # b's request ends
    ta.join(5)
    assert order == ["b", "a"]


def test_admin_exclusive_waits_for_idle():
    s = Scheduler()
    s.acquire("a")
    s.downgrade("a")
    got = []
    t = threading.Thread(target=lambda: got.append(s.acquire(None)))
    t.start()
    _wait_for(lambda: s.snapshot()["waiting"] == 1)
    assert not got
    s.release_shared()
    t.join(5)
    assert got == [True]
    s.release_exclusive()
    assert s.snapshot() == {"exclusive": False, "shared_model": None, "shared_count": 0, "waiting": 0}
