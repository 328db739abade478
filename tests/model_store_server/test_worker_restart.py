"""A worker that restarts behind the store's back, with real services: the store notices before deciding."""

from __future__ import annotations

import shutil

import requests

PROMPT = {"prompt": "hello", "max_tokens": 2}


def ask(store, model):
    r = requests.post(store.url + "/user_request", json={**PROMPT, "model": model}, timeout=60)
    return r.status_code, r.headers.get("X-Cache-Action"), r


def test_worker_restarted_with_an_empty_cache_leaves_no_phantom_entries(services, make_model, tmp_path):
    models = tmp_path / "models"
    for seed, name in enumerate(["a.gguf", "b.gguf", "c.gguf"], start=1):
        make_model(models, name, seed=seed)
    worker = services.worker()
    store = services.store(models, worker, policy="no-evict", max_cache_size=2)
    assert ask(store, "a.gguf")[:2] == (200, "load_from_store")
    assert ask(store, "b.gguf")[:2] == (200, "load_from_store")
    boot_id = requests.get(worker.url + "/health", timeout=10).json()["boot_id"]
    assert requests.get(worker.url + "/models", timeout=10).json()["boot_id"] == boot_id
    worker.stop()
    shutil.rmtree(worker.cache_dir)  # a new machine, or a cache on tmpfs: the files are gone
    worker.start()
    assert requests.get(worker.url + "/health", timeout=10).json()["boot_id"] != boot_id
    # The store believed the cache full (a, b); the worker's disk is empty, so c must be admitted.
    status, action, r = ask(store, "c.gguf")
    assert (status, action) == (200, "load_from_store"), r.text
    listing = requests.get(store.url + "/models", timeout=10).json()
    assert listing["policy"]["cached"] == ["c.gguf"] == sorted(p.name for p in worker.cache_dir.iterdir())


def test_reconciliation_deletions_are_warned_about_and_summed_up(services, make_model, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    make_model(first, "a.gguf", seed=1)
    make_model(first, "b.gguf", seed=2)
    make_model(second, "b.gguf", seed=3)  # same name, other bytes
    make_model(second, "c.gguf", seed=4)
    worker = services.worker()
    store = services.store(first, worker)
    for name in ("a.gguf", "b.gguf"):
        assert ask(store, name)[0] == 200
    store.stop()
    store = services.store(second, worker)  # restarted with another MODELS_DIR
    assert sorted(p.name for p in worker.cache_dir.iterdir()) == []
    lines = store.log().splitlines()
    warned = [line for line in lines if " WARNING " in line and "[reconcile] deleting" in line]
    assert len(warned) == 2
    assert any("a.gguf" in line and "not in MODELS_DIR" in line for line in warned)
    assert any("b.gguf" in line and "differ" in line for line in warned)
    [ready] = [line for line in lines if "store ready:" in line]
    assert "deleted on the worker: [a.gguf, b.gguf]" in ready
