"""Shared fixtures: tiny generated GGUF models and real services on loopback ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import requests

from inference_worker.testing.tiny_gguf import write_tiny_gguf

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class Service:
    """A real service process (gunicorn under `python -m ...`) on a loopback port."""

    def __init__(self, module: str, args: list[str], port: int, log_path: Path, env: dict | None = None):
        self.module, self.args, self.port, self.log_path = module, args, port, log_path
        self.env = dict(os.environ, **(env or {}))
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> "Service":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", self.module, *self.args, "--port", str(self.port)],
                                     cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.module} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/health", timeout=1).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.module} did not answer /health in {timeout_s}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def services(tmp_path):
    """Start real services; every one started is stopped at teardown."""
    started: list[Service] = []

    class Starter:
        def worker(self, cache_dir: Path | None = None, token: str | None = None, extra: list[str] | None = None,
                   port: int | None = None) -> Service:
            cache_dir = cache_dir or tmp_path / "worker-cache"
            args = ["--cache-dir", str(cache_dir), *(["--token", token] if token else []), *(extra or [])]
            svc = Service("inference_worker", args, port or free_port(), tmp_path / f"worker-{len(started)}.log")
            svc.cache_dir = cache_dir
            started.append(svc)
            return svc.start()

        def store(self, models_dir: Path, worker: Service | str, policy: str = "lru", max_cache_size: int = 2,
                  ttl_seconds: float | None = None, extra: list[str] | None = None, token: str | None = None,
                  port: int | None = None) -> Service:
            worker_url = worker if isinstance(worker, str) else worker.url
            args = ["--models-dir", str(models_dir), "--worker-url", worker_url, "--cache-policy", policy,
                    "--max-cache-size", str(max_cache_size), *(extra or [])]
            if ttl_seconds is not None:
                args += ["--ttl-seconds", str(ttl_seconds)]
            if token:
                args += ["--worker-token", token]
            svc = Service("model_store_server", args, port or free_port(), tmp_path / f"store-{len(started)}.log")
            started.append(svc)
            return svc.start()

    yield Starter()
    for svc in reversed(started):
        svc.stop()

