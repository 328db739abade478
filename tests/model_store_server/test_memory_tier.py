"""The memory tier with real services: a worker that holds several models within a budget, and the store
deciding what stays resident. Integration tier: the tests that need two resident models run against a
worker whose GET /models reports its memory (the multi-model worker) and skip, saying so, against a
worker that holds one model at a time; those with one resident model run against either."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from tests.support.held_stream import answered_after_hold
from tests.support.store_harness import wait_for

PROMPT = {"prompt": "hello", "max_tokens": 4}
pytestmark = pytest.mark.slow


def ask(store, model, **extra):
    r = requests.post(store.url + "/user_request", json={**PROMPT, "model": model, **extra}, timeout=120)
    return r.status_code, r.headers.get("X-Cache-Action"), r.headers.get("X-Cache-Unloaded", ""), r.content


def worker_loaded(worker) -> list[str]:
    loaded = requests.get(worker.url + "/models", timeout=10).json()["loaded"]
    return sorted(m["name"] if isinstance(m, dict) else m for m in (loaded or []))


@pytest.fixture
def multi_worker(services):
    """start(max_loaded) -> a worker holding up to max_loaded models; skips on a one-model worker."""
    def start(max_loaded: int):
        worker = services.worker(env={"MAX_LOADED_MODELS": str(max_loaded)})
        if max_loaded > 1 and "memory" not in requests.get(worker.url + "/models", timeout=10).json():
            pytest.skip("this worker holds one model at a time (no memory budget in GET /models)")
        return worker
    return start


def test_two_resident_models_alternate_as_hits_and_a_third_unloads_the_lru(services, multi_worker, models_dir):
    worker = multi_worker(2)
    store = services.store(models_dir, worker, max_cache_size=3)
    assert ask(store, "a.gguf")[1] == "load_from_store"
    assert ask(store, "b.gguf")[1] == "load_from_store"
    for model in ["a.gguf", "b.gguf"] * 3:
        status, action, unloaded, body = ask(store, model)
        assert (status, action, unloaded) == (200, "already_loaded", "") and body
    status, action, unloaded, _ = ask(store, "c.gguf")  # a was used before b's last request
    assert (status, action, unloaded) == (200, "load_from_store", "a.gguf")
    assert worker_loaded(worker) == ["b.gguf", "c.gguf"]
    listing = requests.get(store.url + "/models").json()
    assert sorted(listing["policy"]["loaded"]) == worker_loaded(worker)


def test_keep_alive_unloads_after_silence(services, multi_worker, models_dir):
    worker = multi_worker(2)
    store = services.store(models_dir, worker, extra=["--keep-alive-seconds", "2"])
    assert ask(store, "a.gguf")[0] == 200
    assert worker_loaded(worker) == ["a.gguf"]
    wait_for(lambda: worker_loaded(worker) == [], timeout=30, every=0.1)  # no request comes: the timer unloads it


def test_a_swap_waits_for_the_busy_models_stream(services, models_dir):
    """b's swap must unload a, whose stream is held unread (so a is busy for as long as the test says, on
    any machine): the store shows b's swap draining a and b is not answered; when a's reader hangs up,
    b's swap goes on. (Reading a on after a hold sometimes stalled for tens of seconds in the sockets;
    that a drained stream completes is held over the fake worker, test_tiers.py.)"""
    worker = services.worker(env={"MAX_LOADED_MODELS": "1"}, extra=["--n-ctx", "4096"])
    store = services.store(models_dir, worker, max_cache_size=3, extra=["--max-swap-wait-ms", "0"])
    assert ask(store, "a.gguf")[0] == 200
    status, action, unloaded, body = answered_after_hold(store.url, "a.gguf", lambda: ask(store, "b.gguf"))
    assert (status, action, unloaded) == (200, "load_from_store", "a.gguf") and body


@pytest.mark.parametrize("max_loaded", [1, 2])
def test_mixed_load_keeps_the_views_equal(services, multi_worker, models_dir, max_loaded):
    worker = multi_worker(max_loaded)
    store = services.store(models_dir, worker, max_cache_size=2, extra=["--max-swap-wait-ms", "200"])
    names = ["a.gguf", "b.gguf", "c.gguf"]
    results, lock = [], threading.Lock()
    stop = time.monotonic() + 3

    def client(i):
        j = 0
        while time.monotonic() < stop:
            out = ask(store, names[(i + j) % 3])
            j += 1
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results and all(status == 200 and body for status, _, _, body in results)
    transfers = sum(1 for _, action, _, _ in results if action == "load_from_store")
    received = requests.get(worker.url + "/metrics").text
    ok = sum(float(line.rsplit(" ", 1)[1]) for line in received.splitlines()
             if line.startswith('worker_model_receives_total{result="ok"}'))
    assert ok == transfers, "one transfer per admission"
    listing = requests.get(store.url + "/models").json()
    assert sorted(listing["policy"]["cached"]) == sorted(listing["worker"]["cached"])
    assert sorted(listing["policy"]["loaded"]) == sorted(listing["worker"]["loaded"])


def test_a_restarted_store_adopts_the_models_in_memory(services, multi_worker, models_dir):
    worker = multi_worker(2)
    store = services.store(models_dir, worker, max_cache_size=3)
    assert ask(store, "a.gguf")[1] == "load_from_store"
    assert ask(store, "b.gguf")[1] == "load_from_store"
    store.stop()
    store = services.store(models_dir, worker, max_cache_size=3)
    assert [ask(store, m)[1] for m in ("a.gguf", "b.gguf")] == ["already_loaded", "already_loaded"]
    assert worker_loaded(worker) == ["a.gguf", "b.gguf"]
