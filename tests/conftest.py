"""Shared fixtures: tiny generated GGUF models and real services on loopback ports."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path
from typing import Callable

import pytest

from inference_worker.testing.tiny_gguf import write_tiny_gguf
from model_swap.testing import ServiceProcess


@pytest.fixture(scope="session")
def _tiny_model_pool(tmp_path_factory) -> Callable[[int, float | None], Path]:
    """Generate each (seed, size) once per session."""
    pool_dir = tmp_path_factory.mktemp("tiny-models")
    made: dict[tuple[int, float | None], Path] = {}

    def get(seed: int, size_mb: float | None) -> Path:
        key = (seed, size_mb)
        if key not in made:
            made[key] = write_tiny_gguf(pool_dir / f"seed{seed}-{size_mb}.gguf", seed=seed, size_mb=size_mb)
        return made[key]

    return get


@pytest.fixture
def make_model(_tiny_model_pool) -> Callable[..., Path]:
    """make_model(directory, name, seed=0, size_mb=None) puts a tiny valid GGUF model there."""

    def make(directory: Path, name: str, seed: int = 0, size_mb: float | None = None) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / name
        shutil.copyfile(_tiny_model_pool(seed, size_mb), target)
        return target

    return make


@pytest.fixture
def services(tmp_path):
    """Start real services; every one started is stopped at teardown."""
    started: list[ServiceProcess] = []

    class Starter:
        def worker(self, cache_dir: Path | None = None, token: str | None = None, extra: list[str] | None = None,
                   port: int | None = None, env: dict[str, str] | None = None) -> ServiceProcess:
            cache_dir = cache_dir or tmp_path / "worker-cache"
            args = ["--cache-dir", str(cache_dir), *(["--token", token] if token else []), *(extra or [])]
            svc = ServiceProcess("inference_worker", args, tmp_path / f"worker-{len(started)}.log", port, env)
            svc.cache_dir = cache_dir
            started.append(svc)
            return svc.start()

        def store(self, models_dir: Path, worker: ServiceProcess | str, policy: str = "lru", max_cache_size: int = 2,
                  ttl_seconds: float | None = None, extra: list[str] | None = None, token: str | None = None,
                  port: int | None = None, env: dict[str, str] | None = None) -> ServiceProcess:
            worker_url = worker if isinstance(worker, str) else worker.url
            args = ["--models-dir", str(models_dir), "--worker-url", worker_url, "--cache-policy", policy,
                    "--max-cache-size", str(max_cache_size), *(extra or [])]
            if ttl_seconds is not None:
                args += ["--ttl-seconds", str(ttl_seconds)]
            if token:
                args += ["--worker-token", token]
            svc = ServiceProcess("model_store_server", args, tmp_path / f"store-{len(started)}.log", port, env)
            started.append(svc)
            return svc.start()

    yield Starter()
    # Responses the test still holds (in reference cycles) keep their connections open, and a
    # stopping gunicorn lingers 2 s on each kept-alive one: close them first.
    gc.collect()
    for svc in reversed(started):
        svc.stop()

