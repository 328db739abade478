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
    worker.stop()
    shutil.rmtree(worker.cache_dir)  # a new machine, or a cache on tmpfs: the files are gone
    worker.start()
    # The store believed the cache full (a, b); the worker's disk is empty, so c must be admitted.
    status, action, r = ask(store, "c.gguf")
    assert (status, action) == (200, "load_from_store"), r.text
    listing = requests.get(store.url + "/models", timeout=10).json()
    assert listing["policy"]["cached"] == ["c.gguf"] == sorted(p.name for p in worker.cache_dir.iterdir())


def test_worker_reports_a_boot_id_that_changes_on_restart(services):
    worker = services.worker()
    first = requests.get(worker.url + "/health", timeout=10).json()["boot_id"]
    assert requests.get(worker.url + "/models", timeout=10).json()["boot_id"] == first
    worker.stop()
    worker.start()
    assert requests.get(worker.url + "/health", timeout=10).json()["boot_id"] != first
