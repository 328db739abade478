"""A store app in front of a FakeWorker, for fast tests of the store's rules."""

from __future__ import annotations

import os
import struct
from dataclasses import replace
from pathlib import Path

from model_store_server import create_app
from model_store_server.config import StoreConfig
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


def core_of(app):
    return app.extensions["store"]["core"]
