"""The store's view of MODELS_DIR: changed files, unusable files, skipped names (real files, real services)."""

from __future__ import annotations

import hashlib
import os

import requests

PROMPT = {"prompt": "hello", "max_tokens": 2}


def ask(store, model):
    r = requests.post(store.url + "/user_request", json={**PROMPT, "model": model}, timeout=60)
    return r.status_code, r.headers.get("X-Cache-Action"), r


def worker_sha(worker, name):
    return {m["name"]: m["sha256"] for m in requests.get(worker.url + "/models", timeout=10).json()["cached"]}[name]


def test_file_rewritten_in_place_with_the_same_size_and_mtime_is_sent_again(services, make_model, tmp_path):
    models = tmp_path / "models"
    path = make_model(models, "a.gguf", seed=1)
    other = make_model(tmp_path / "other", "a.gguf", seed=2).read_bytes()
    assert len(other) == path.stat().st_size
    worker = services.worker()
    store = services.store(models, worker)
    assert ask(store, "a.gguf")[:2] == (200, "load_from_store")
    before = path.stat()
    with open(path, "r+b") as f:  # same inode, same size; the mtime is put back as it was
        f.write(other)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    status, action, r = ask(store, "a.gguf")
    assert (status, action) == (200, "load_from_store"), r.text
    assert worker_sha(worker, "a.gguf") == hashlib.sha256(other).hexdigest()
