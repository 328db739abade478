"""Requests that fail during the swap still get their log line and, after a decision, the cache headers."""

from __future__ import annotations

import re

import pytest
import requests

from inference_worker.testing.tiny_gguf import write_unloadable_gguf

PROMPT = {"prompt": "hello", "max_tokens": 2}


def request_lines(store, endpoint="/user_request"):
    return [line for line in store.log().splitlines() if f"[{endpoint}]" in line]




@pytest.fixture
def models_dir(make_model, tmp_path):
    d = tmp_path / "models"
    for seed, name in enumerate(["a.gguf", "b.gguf", "c.gguf"], start=1):
        make_model(d, name, seed=seed)
    write_unloadable_gguf(d / "alien.gguf")
    return d


def test_cache_full_is_logged_and_carries_the_headers(services, models_dir):
    worker = services.worker()
    store = services.store(models_dir, worker, policy="no-evict", max_cache_size=2)
    for name in ("a.gguf", "b.gguf"):
        assert requests.post(store.url + "/user_request", json={**PROMPT, "model": name}, timeout=60).ok
    r = requests.post(store.url + "/user_request", json={**PROMPT, "model": "c.gguf"}, timeout=60)
    assert r.status_code == 503 and r.json()["error"]["code"] == "cache_full"
    assert r.headers["X-Cache-Action"] == "rejected" and r.headers["X-Cache-Evicted"] == ""
    assert float(r.headers["X-Decision-Ms"]) >= 0
    lines = request_lines(store)
    assert len(lines) == 3
    assert "model=c.gguf" in lines[-1] and "action=rejected" in lines[-1] and lines[-1].endswith("error=cache_full")


def test_load_failed_after_a_transfer_is_logged_with_what_the_swap_did(services, models_dir):
    worker = services.worker()
    store = services.store(models_dir, worker, policy="lru", max_cache_size=1)
    assert requests.post(store.url + "/user_request", json={**PROMPT, "model": "a.gguf"}, timeout=60).ok
    r = requests.post(store.url + "/v1/completions", json={**PROMPT, "model": "alien.gguf"}, timeout=60)
    assert r.status_code == 502 and r.json()["error"]["code"] == "load_failed"
    assert r.headers["X-Cache-Action"] == "load_from_store"
    assert r.headers["X-Cache-Evicted"] == "a.gguf" and r.headers["X-Transport"] == "http"
    assert float(r.headers["X-Worker-Ms"]) > 0
    [line] = request_lines(store, "/v1/completions")
    assert "model=alien.gguf action=load_from_store" in line and "evicted=[a.gguf]" in line
    assert line.endswith("error=load_failed")


def test_every_request_gets_one_line_even_without_a_decision(services, models_dir):
    worker = services.worker()
    store = services.store(models_dir, worker)
    assert requests.post(store.url + "/user_request", json={**PROMPT, "model": "a.gguf"}, timeout=60).ok
    worker.stop()
    r = requests.post(store.url + "/user_request", json={**PROMPT, "model": "b.gguf"}, timeout=60)
    assert r.status_code == 502 and r.json()["error"]["code"] == "worker_unavailable"
    r = requests.post(store.url + "/user_request", json={**PROMPT, "model": "missing.gguf"}, timeout=60)
    assert r.status_code == 404
    r = requests.post(store.url + "/user_request", json={"model": "a.gguf"}, timeout=60)
    assert r.status_code == 400
    codes = [re.search(r"error=(\w+)$", line) for line in request_lines(store)]
    assert [c.group(1) if c else None for c in codes] == [None, "worker_unavailable", "model_not_found",
                                                          "invalid_request"]
