"""Shared fixtures: tiny generated GGUF models and real services on loopback ports."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path
from typing import Callable

import pytest

from inference_worker.testing.tiny_gguf import write_tiny_gguf
from model_swap.testing import REPO, ServiceProcess


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


def _model_maker(pool: Callable[[int, float | None], Path]) -> Callable[..., Path]:
    def make(directory: Path, name: str, seed: int = 0, size_mb: float | None = None) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / name
        shutil.copyfile(pool(seed, size_mb), target)
        return target

    return make


@pytest.fixture
def make_model(_tiny_model_pool) -> Callable[..., Path]:
    """make_model(directory, name, seed=0, size_mb=None) puts a tiny valid GGUF model there."""
    return _model_maker(_tiny_model_pool)


class ServiceStarter:
    """Starts real services whose logs and caches live in one directory; stop_all() ends them."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.started: list[ServiceProcess] = []

    def worker(self, cache_dir: Path | None = None, token: str | None = None, extra: list[str] | None = None,
               port: int | None = None, env: dict[str, str] | None = None) -> ServiceProcess:
        cache_dir = cache_dir or self.directory / "worker-cache"
        args = ["--cache-dir", str(cache_dir), *(["--token", token] if token else []), *(extra or [])]
        svc = ServiceProcess("inference_worker", args, self.directory / f"worker-{len(self.started)}.log", port,
                             env)
        svc.cache_dir = cache_dir
        self.started.append(svc)
        return svc.start()

    def store(self, models_dir: Path, worker: ServiceProcess | str, policy: str = "lru", max_cache_size: int = 2,
              ttl_seconds: float | None = None, extra: list[str] | None = None, token: str | None = None,
              port: int | None = None, env: dict[str, str] | None = None) -> ServiceProcess:
        worker_url = worker if isinstance(worker, str) else worker.url
        # The sessions database lives with the test's services (a restarted store finds it again), not in ./run.
        args = ["--models-dir", str(models_dir), "--worker-url", worker_url, "--cache-policy", policy,
                "--max-cache-size", str(max_cache_size), "--sessions-db", str(self.directory / "sessions.db"),
                *(extra or [])]
        if ttl_seconds is not None:
            args += ["--ttl-seconds", str(ttl_seconds)]
        if token:
            args += ["--worker-token", token]
        svc = ServiceProcess("model_store_server", args, self.directory / f"store-{len(self.started)}.log", port,
                             env)
        self.started.append(svc)
        return svc.start()

    def stop_all(self) -> None:
        # Responses a test still holds (in reference cycles) keep their connections open, and a
        # stopping gunicorn lingers 2 s on each kept-alive one: close them first.
        gc.collect()
        for svc in reversed(self.started):
            svc.stop()


@pytest.fixture
def services(tmp_path):
    """Start real services; every one started is stopped at teardown."""
    starter = ServiceStarter(tmp_path)
    yield starter
    starter.stop_all()


@pytest.fixture(scope="module")
def module_services(tmp_path_factory):
    """Like services, shared by a module's tests (for tests that do not disturb each other)."""
    starter = ServiceStarter(tmp_path_factory.mktemp("module-services"))
    yield starter
    starter.stop_all()


@pytest.fixture(scope="module")
def module_model(_tiny_model_pool) -> Callable[..., Path]:
    """make_model for module-scoped fixtures."""
    return _model_maker(_tiny_model_pool)


@pytest.fixture(scope="session")
def real_model() -> Callable[[str], Path]:
    """real_model(name): a real model fetched into ./models by scripts/test.sh; skips the test if it is absent."""

    def get(name: str) -> Path:
        path = REPO / "models" / name
        if not path.is_file():
            pytest.skip(f"{name} is not in ./models (scripts/test.sh fetches it)")
        return path

    return get
