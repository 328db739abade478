"""The cache policies as pure decisions: one contract suite plus each policy's own rules."""

from __future__ import annotations

import pytest

from model_store_server.policy import CacheFull, TooLargeForCache, build_policy


class FakeTimer:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def timer():
    return FakeTimer()


ALL = ["lru", "no-evict", "ttl", "lru-ttl"]


def make(policy, timer, max_count=2, max_bytes=None, ttl=5.0):
    return build_policy(policy, max_count, max_bytes, ttl, timer=timer)


# --- the contract every policy keeps ---------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_admit_then_contains(name, timer):
    p = make(name, timer)
    assert p.admit("a.gguf", 10).evicted == ()
    assert "a.gguf" in p and p.entries() == ["a.gguf"]


@pytest.mark.parametrize("name", ALL)
def test_readmitting_present_model_evicts_nothing(name, timer):
    p = make(name, timer)
    p.admit("a.gguf", 10)
    assert p.admit("a.gguf", 10).evicted == ()
    assert p.entries() == ["a.gguf"]


@pytest.mark.parametrize("name", ALL)
def test_discard_and_clear(name, timer):
    p = make(name, timer)
    p.admit("a.gguf", 10)
    p.admit("b.gguf", 10)
    assert p.discard("a.gguf") and not p.discard("a.gguf")
    assert p.entries() == ["b.gguf"]
    p.clear()
    assert p.entries() == []


@pytest.mark.parametrize("name", ALL)
def test_touch_reports_presence(name, timer):
    p = make(name, timer)
    assert p.touch("a.gguf") is False
    p.admit("a.gguf", 1)
    assert p.touch("a.gguf") is True


@pytest.mark.parametrize("name", ALL)
def test_byte_bound_refuses_model_larger_than_cache(name, timer):
    p = make(name, timer, max_bytes=100)
    with pytest.raises(TooLargeForCache):
        p.admit("big.gguf", 101)
    assert p.entries() == []


@pytest.mark.parametrize("name", ALL)
def test_copy_is_independent_and_keeps_the_clock(name, timer):
    p = make(name, timer)
    p.admit("a.gguf", 1)
    q = p.copy()
    q.admit("b.gguf", 1)
    q.discard("a.gguf")
    assert p.entries() == ["a.gguf"] and q.entries() == ["b.gguf"]
    timer.tick(6)  # past the ttl: the copy's entries expire with the original's clock
    assert ("b.gguf" in q) is (name in ("lru", "no-evict"))


@pytest.mark.parametrize("name", ["ttl", "lru-ttl"])
def test_expired_lists_what_awaits_the_sweep_without_dropping_it(name, timer):
    p = make(name, timer)
    p.admit("a.gguf", 1)
    timer.tick(3)
    p.admit("b.gguf", 1)
    timer.tick(3)
    assert p.expired() == ["a.gguf"]
    assert p.entries() == ["a.gguf", "b.gguf"]  # still listed until deleted
    assert p.discard("a.gguf") and p.expired() == []


# --- lru ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lru", "lru-ttl"])
def test_lru_evicts_least_recently_used(name, timer):
    p = make(name, timer)
    p.admit("a.gguf", 1)
    p.admit("b.gguf", 1)
    p.touch("a.gguf")  # b is now least recently used
    assert p.admit("c.gguf", 1).evicted == ("b.gguf",)
    assert sorted(p.entries()) == ["a.gguf", "c.gguf"]


def test_lru_byte_bound_evicts_until_it_fits(timer):
    p = make("lru", timer, max_count=10, max_bytes=100)
    p.admit("a.gguf", 40)
    p.admit("b.gguf", 40)
    p.admit("c.gguf", 20)
    assert p.admit("d.gguf", 70).evicted == ("a.gguf", "b.gguf")
    assert p.total_bytes() == 90


# --- no-evict -------------------------------------------------------------------------------

def test_no_evict_refuses_when_full_and_changes_nothing(timer):
    p = make("no-evict", timer)
    p.admit("a.gguf", 1)
    p.admit("b.gguf", 1)
    with pytest.raises(CacheFull):
        p.admit("c.gguf", 1)
    assert p.entries() == ["a.gguf", "b.gguf"]


def test_no_evict_byte_bound_refuses(timer):
    p = make("no-evict", timer, max_count=10, max_bytes=100)
    p.admit("a.gguf", 60)
    with pytest.raises(CacheFull):
        p.admit("b.gguf", 50)
    assert p.entries() == ["a.gguf"]


# --- ttl ------------------------------------------------------------------------------------

def test_ttl_has_no_capacity_bound(timer):
    p = make("ttl", timer, max_count=2)
    for i in range(5):
        assert p.admit(f"m{i}.gguf", 1).evicted == ()
    assert len(p.entries()) == 5


def test_ttl_sweeps_expired_on_next_admission(timer):
    p = make("ttl", timer, ttl=5)
    p.admit("a.gguf", 1)
    timer.tick(3)
    p.admit("b.gguf", 1)
    timer.tick(3)  # a is 6 s untouched, b 3 s
    assert "a.gguf" not in p
    assert p.admit("c.gguf", 1).evicted == ("a.gguf",)
    assert sorted(p.entries()) == ["b.gguf", "c.gguf"]


def test_ttl_touch_restarts_the_clock(timer):
    p = make("ttl", timer, ttl=5)
    p.admit("a.gguf", 1)
    timer.tick(4)
    assert p.touch("a.gguf")
    timer.tick(4)
    assert p.admit("b.gguf", 1).evicted == ()
    assert "a.gguf" in p


def test_ttl_expired_entries_stay_listed_until_the_next_admission(timer):
    p = make("ttl", timer, ttl=5)
    p.admit("a.gguf", 1)
    timer.tick(3)
    p.admit("b.gguf", 1)
    timer.tick(3)  # a expired; b not
    assert "a.gguf" not in p
    # A hit on b makes cachetools sweep a on its own; a's file is still on the worker.
    assert p.touch("b.gguf")
    assert p.entries() == ["a.gguf", "b.gguf"]
    assert p.admit("c.gguf", 1).evicted == ("a.gguf",)
    assert p.entries() == ["b.gguf", "c.gguf"]


def test_ttl_readmitting_an_expired_model_lists_it_as_evicted(timer):
    p = make("ttl", timer, ttl=5)
    p.admit("a.gguf", 1)
    timer.tick(6)
    assert p.admit("a.gguf", 1).evicted == ("a.gguf",)  # the store keeps its file and loads it again
    assert p.entries() == ["a.gguf"]


def test_discard_forgets_a_pending_expired_entry(timer):
    p = make("ttl", timer, ttl=1)
    p.admit("a.gguf", 1)
    timer.tick(2)
    assert p.entries() == ["a.gguf"]
    assert p.discard("a.gguf")
    assert p.entries() == []


def test_untimed_policies_never_expire(timer):
    p = make("lru", timer)
    p.admit("a.gguf", 1)
    timer.tick(10_000)
    assert p.admit("b.gguf", 1).evicted == () and "a.gguf" in p


# --- lru-ttl --------------------------------------------------------------------------------

def test_lru_ttl_capacity_then_time(timer):
    p = make("lru-ttl", timer, ttl=5)
    p.admit("a.gguf", 1)
    p.admit("b.gguf", 1)
    assert p.admit("c.gguf", 1).evicted == ("a.gguf",)  # capacity
    timer.tick(6)
    assert p.admit("a.gguf", 1).evicted == ("b.gguf", "c.gguf")  # time: both expired
    assert p.entries() == ["a.gguf"]


def test_unknown_policy_is_refused(timer):
    with pytest.raises(ValueError):
        build_policy("fifo", 2)


def test_touch_at_the_expiry_instant_does_not_raise():
    times = iter([0.0, 3.9999, 4.0001, 4.0001, 4.0001])
    p = build_policy("ttl", 2, None, 4.0, timer=lambda: next(times))
    p.admit("a.gguf", 1)
    # The clock is read once for the whole touch: it either finds a live entry or none.
    assert p.touch("a.gguf") in (True, False)


def test_use_revives_an_entry_that_expired_while_in_use(timer):
    p = make("ttl", timer, ttl=4)
    p.admit("a.gguf", 7)
    timer.tick(10)  # a long stream
    assert p.touch("a.gguf") is False
    assert p.use("a.gguf") is True
    timer.tick(1)
    assert p.admit("b.gguf", 1).evicted == ()
    assert sorted(p.entries()) == ["a.gguf", "b.gguf"] and p.total_bytes() == 8
