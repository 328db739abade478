"""The gates' rules with real threads: open models never wait, one change at a time, in arrival order."""

from __future__ import annotations

import threading
import time

import pytest

from model_store_server.gates import LANE, USE, QueueFull, QueueTimeout, WorkerGates
from tests.support.store_harness import wait_for

FAR = time.monotonic() + 3600


def in_thread(fn, *args):
    out = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()
    return t, out


def test_open_model_is_used_while_the_lane_is_held():
    g = WorkerGates()
    g.open("a")
    assert g.enter("b", FAR) == LANE  # a change for b holds the lane...
    assert g.enter("a", FAR) == USE  # ...and a request for resident a does not wait for it
    assert g.busy() == {"a"}


def test_requests_for_the_model_being_brought_join_it():
    g = WorkerGates()
    assert g.enter("b", FAR) == LANE
    t, out = in_thread(g.enter, "b", FAR)
    wait_for(lambda: g.waiting("b") == 1)
    g.open("b", use=True)
    g.leave_lane()
    t.join(5)
    assert out == [USE] and g.snapshot()["uses"] == {"b": 2}


def test_changes_take_the_lane_in_arrival_order():
    g = WorkerGates()
    assert g.enter("a", FAR) == LANE
    order = []

    def change(model):
        assert g.enter(model, FAR) == LANE
        order.append(model)
        g.leave_lane()

    threads = []
    for model in ("b", "c", "d"):
        t = threading.Thread(target=change, args=(model,))
        t.start()
        threads.append(t)
        wait_for(lambda m=model: g.waiting(m) == 1)
    g.leave_lane()
    for t in threads:
        t.join(5)
    assert order == ["b", "c", "d"]


def test_try_close_refuses_a_busy_model_and_closes_an_idle_one():
    g = WorkerGates()
    g.open("a")
    g.open("b")
    assert g.enter("a", FAR) == USE
    assert g.try_close(["a", "b"]) is False
    assert g.is_open("a") and g.is_open("b"), "nothing closes when one of them is busy"
    assert g.end_use("a") == 0
    assert g.try_close(["a", "b"]) is True
    assert not g.is_open("a") and not g.is_open("b")


def test_a_closed_model_drains_and_new_requests_for_it_wait():
    g = WorkerGates()
    g.open("a")
    assert g.enter("a", FAR) == USE
    assert g.enter("c", FAR) == LANE  # a change that needs a's memory
    assert g.close(["a"]) == {"a"}
    t, out = in_thread(g.enter, "a", FAR)
    wait_for(lambda: g.waiting("a") == 1)
    assert out == [] and g.busy() == {"a"}
    g.end_use("a")
    assert g.try_close(["a"])
    g.forget("a")  # unloaded
    g.leave_lane()
    t.join(5)
    assert out == [LANE], "the request for a brings it back, after the change"


def test_reopen_lets_requests_use_it_again():
    g = WorkerGates()
    g.open("a")
    g.close(["a"])
    g.reopen(["a"])
    assert g.enter("a", FAR) == USE


def test_queue_full_is_a_429_with_retry_after():
    g = WorkerGates(max_queue=2)
    assert g.enter("x", FAR) == LANE
    threads = [in_thread(g.enter, "b", FAR)[0] for _ in range(2)]
    wait_for(lambda: g.waiting("b") == 2)
    with pytest.raises(QueueFull) as caught:
        g.enter("b", FAR)
    assert caught.value.status == 429 and caught.value.code == "queue_full"
    assert caught.value.headers["Retry-After"] == "1"
    g.leave_lane()
    for t in threads:  # each takes the lane in turn
        wait_for(lambda: g.snapshot()["lane_busy"])
        g.leave_lane()
        t.join(5)


def test_waiting_past_the_deadline_is_a_503_and_leaves_no_trace():
    g = WorkerGates()
    assert g.enter("x", FAR) == LANE
    with pytest.raises(QueueTimeout) as caught:
        g.enter("b", time.monotonic() + 0.05)
    assert caught.value.status == 503 and caught.value.code == "queue_timeout"
    assert g.snapshot()["lane_queue"] == 0 and g.waiting("b") == 0


def test_may_use_false_goes_to_the_lane_even_when_open():
    g = WorkerGates()
    g.open("a")
    assert g.enter("a", FAR, may_use=False) == LANE


def test_sync_opens_exactly_the_resident_models():
    g = WorkerGates()
    g.open("a")
    g.close(["a"])
    g.open("b")
    g.sync(["a", "c"])
    snap = g.snapshot()
    assert snap["open"] == ["a", "c"] and snap["closed"] == []
