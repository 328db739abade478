"""A store app in front of a FakeWorker, for fast tests of the store's rules."""

from __future__ import annotations

import os
import struct
import time
from dataclasses import replace
from pathlib import Path

from model_store_server import create_app
from model_store_server.config import StoreConfig
from model_store_server.workers_config import WorkerSpec
from tests.support.fake_worker import FakeWorker


def write_models(directory: Path, names: list[str], size: int = 4096) -> Path:
    """Files with distinct bytes under `names`: a GGUF header with no tensors (the store checks it), then noise."""
    directory.mkdir(parents=True, exist_ok=True)
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 0)  # version 3, no tensors, no metadata
    for name in names:
        (directory / name).write_bytes(header + name.encode() + os.urandom(size))
    return directory


def fake_store(tmp_path: Path, fake: FakeWorker | None = None, models: tuple[str, ...] = ("a.gguf", "b.gguf", "c.gguf"),
               models_dir: Path | None = None, **settings):
    """(app, fake worker): a store over `models` (or an existing models_dir) whose worker is a FakeWorker;
    settings override StoreConfig."""
    fake = fake or FakeWorker()
    models_dir = models_dir or write_models(tmp_path / "store-models", list(models))
    config = replace(StoreConfig(models_dir=models_dir), **settings)
    app = create_app(config, worker=fake)
    app.config["TESTING"] = True
    return app, fake


def fake_workers_store(tmp_path: Path, fakes: list[FakeWorker],
                       models: tuple[str, ...] = ("a.gguf", "b.gguf", "c.gguf"), **settings):
    """A store over several FakeWorkers, named w0, w1, ...; settings override StoreConfig.

    A second call with the same tmp_path reuses the models (a store restarted over the same files)."""
    workers = tuple(WorkerSpec(f"w{i}", f"http://fake-{i}:8080") for i in range(len(fakes)))
    models_dir = tmp_path / "store-models"
    if not models_dir.exists():
        write_models(models_dir, list(models))
    config = replace(StoreConfig(models_dir=models_dir, workers=workers), **settings)
    app = create_app(config, worker=list(fakes))
    app.config["TESTING"] = True
    return app


def core_of(app):
    return app.extensions["store"]["core"]


PROMPT = {"prompt": "hi", "max_tokens": 4}


def ask(client, model, **extra):
    """One /user_request through a Flask test client, read to the end and closed (as a real client does),
    so its lease ends."""
    r = client.post("/user_request", json={**PROMPT, "model": model, **extra})
    r.get_data()
    r.close()
    return r


def wait_for(predicate, timeout: float = 5.0, every: float = 0.002) -> None:
    """Poll `predicate` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(every)
