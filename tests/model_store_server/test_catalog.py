"""The store's view of MODELS_DIR: changed files, unusable files, skipped names (real files, real services)."""

from __future__ import annotations

import hashlib
import os

import requests

from inference_worker.testing.tiny_gguf import write_unloadable_gguf

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


def metric(service, name):
    text = requests.get(service.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def write_unusable_models(models, good: bytes) -> dict[str, bytes]:
    """Files that are not usable GGUF models, by name."""
    import struct

    bad = {
        "wrong-magic.gguf": b"GGML" + good[4:],
        "truncated.gguf": good[: len(good) // 2],
        "absurd-counts.gguf": b"GGUF" + struct.pack("<IQQ", 3, 1 << 60, 1 << 60) + good[24:],
        "bad-version.gguf": b"GGUF" + struct.pack("<I", 99) + good[8:],
        "empty.gguf": b"",
    }
    for name, data in bad.items():
        (models / name).write_bytes(data)
    return bad


def test_an_invalid_gguf_file_is_refused_without_touching_the_worker(services, make_model, tmp_path):
    models = tmp_path / "models"
    good = make_model(models, "a.gguf", seed=1).read_bytes()
    bad = write_unusable_models(models, good)
    worker = services.worker()
    store = services.store(models, worker, policy="lru", max_cache_size=1)
    assert ask(store, "a.gguf")[:2] == (200, "load_from_store")
    received = metric(worker, "worker_model_receives_total")
    for name in bad:
        status, _, r = ask(store, name)
        assert status == 422 and r.json()["error"]["code"] == "invalid_model", (name, r.text)
    assert metric(worker, "worker_model_receives_total") == received
    assert sorted(p.name for p in worker.cache_dir.iterdir()) == ["a.gguf"]  # nothing evicted for them
    assert ask(store, "a.gguf")[:2] == (200, "already_loaded")
    listing = requests.get(store.url + "/models", timeout=10).json()
    assert [m["name"] for m in listing["models"]] == ["a.gguf"]
    unusable = {u["name"]: u["reason"] for u in listing["unusable"]}
    assert set(unusable) == set(bad) and all(unusable.values())


def test_skipped_files_are_listed_as_unusable_and_logged_once(services, make_model, tmp_path):
    models = tmp_path / "models"
    make_model(models, "a.gguf", seed=1)
    for name in ("My Model.gguf", "X.GGUF", "sub/c.gguf", ".hidden.gguf"):
        make_model(models, name, seed=2) if "/" not in name else make_model(models / "sub", "c.gguf", seed=2)
    worker = services.worker()
    store = services.store(models, worker)
    for _ in range(2):
        listing = requests.get(store.url + "/models", timeout=10).json()
    assert [m["name"] for m in listing["models"]] == ["a.gguf"]
    unusable = {u["name"]: u["reason"] for u in listing["unusable"]}
    assert set(unusable) == {"My Model.gguf", "X.GGUF", "sub/c.gguf", ".hidden.gguf"} and all(unusable.values())
    log = store.log()
    for name in unusable:
        assert log.count(f"skipping {name!r}") == 1, name


def test_a_model_the_worker_cannot_load_after_a_prefetch_gives_its_slot_back(services, make_model, tmp_path):
    models = tmp_path / "models"
    make_model(models, "a.gguf", seed=1)
    write_unloadable_gguf(models / "alien.gguf")  # a valid file llama.cpp refuses
    worker = services.worker()
    store = services.store(models, worker, policy="no-evict", max_cache_size=2)
    r = requests.post(store.url + "/admin/prefetch", json={"model": "alien.gguf"}, timeout=60)
    assert r.status_code == 200 and r.json()["action"] == "cached"
    status, _, r = ask(store, "alien.gguf")
    assert status == 502 and r.json()["error"]["code"] == "load_failed"
    listing = requests.get(store.url + "/models", timeout=10).json()
    assert listing["policy"]["cached"] == [] == listing["worker"]["cached"]
    assert ask(store, "a.gguf")[:2] == (200, "load_from_store")
