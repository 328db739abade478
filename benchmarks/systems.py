"""The systems under comparison, each started on a free loopback port and stopped after its turn."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from model_swap.testing import REPO, ServiceProcess, free_port

log = logging.getLogger(__name__)
# Where benchmarks/build_llama_server.sh leaves the binary.
LLAMA_SERVER = (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "model-swap/llama-server/bin/llama-server")
N_CTX = 2048


def session_rss_bytes(session_id: int) -> int:
    """Resident memory of every process in a session (a service and the children it started)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != session_id:  # fields after the name: state, ppid, pgrp, session
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        total += int(match.group(1)) * 1024 if match else 0
    return total


class Peer:
    """A server binary or module started in its own session; start() waits until `ready_path` answers."""

    def __init__(self, argv: list[str], log_path: Path, port: int, ready_path: str):
        self.argv, self.log_path, self.port, self.ready_path = argv, log_path, port, ready_path
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> "Peer":
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}: {self._tail()}")
            try:
                if requests.get(self.url + self.ready_path, timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.argv[0]} did not answer {self.ready_path} in {timeout_s:.0f}s: {self._tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc:  # children of a router may outlive it for a moment
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""


class System:
    """What the workloads need from a system; subclasses start and stop it."""

    key = ""
    label = ""
    can_cold_swap = False  # does it have a cache a model can be absent from (a transfer to measure)?
    version = ""
    notes = ""

    def unavailable(self) -> str | None:
        """Why this system cannot run here, or None."""
        return None

    def start(self, models: list[Path], workdir: Path, threads: int) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    @property
    def url(self) -> str:
        raise NotImplementedError

    def model_id(self, path: Path) -> str:
        return path.name

    def session_ids(self) -> list[int]:
        raise NotImplementedError

    def rss_bytes(self) -> int:
        """Resident memory of the process(es) that hold the models."""
        return sum(session_rss_bytes(sid) for sid in self.session_ids())

    def make_cold(self) -> None:
        """Remove every model from the system's cache (only where can_cold_swap)."""
        raise NotImplementedError


def _worker_thread_flags(threads: int) -> list[str]:
    """--n-threads if this worker has it (newer workers); otherwise none (N_THREADS is set too)."""
    help_text = subprocess.run([sys.executable, "-m", "inference_worker", "--help"], cwd=REPO, capture_output=True,
                               text=True, timeout=60).stdout
    return ["--n-threads", str(threads)] if "--n-threads" in help_text else []


class ModelSwap(System):
    """This project: the store (lru, cache 2) in front of one worker, files pushed over HTTP."""

    key = "model-swap"
    label = "model-swap (lru, cache 2)"
    can_cold_swap = True

    def __init__(self, max_cache_size: int = 2):
        self.max_cache_size = max_cache_size
        self.worker: ServiceProcess | None = None
        self.store: ServiceProcess | None = None
        self.version = _git_version()

    def start(self, models: list[Path], workdir: Path, threads: int) -> None:
        thread_flags = _worker_thread_flags(threads)
        if not thread_flags:
            self.notes = (f"this worker has no --n-threads: llama-cpp-python's default, "
                          f"{max(1, (os.cpu_count() or 2) // 2)} thread(s)")
        env = {"N_THREADS": str(threads)}
        self.worker = ServiceProcess("inference_worker", ["--cache-dir", str(workdir / "worker-cache"), "--log-level",
                                                          "WARNING", *thread_flags], workdir / "worker.log",
                                     env=env).start()
        self.store = ServiceProcess("model_store_server", [
            "--models-dir", str(models[0].parent), "--worker-url", self.worker.url, "--cache-policy", "lru",
            "--max-cache-size", str(self.max_cache_size), "--log-level", "WARNING"], workdir / "store.log").start()

    def stop(self) -> None:
        for service in (self.store, self.worker):
            if service:
                service.stop()

    @property
    def url(self) -> str:
        return self.store.url

    def session_ids(self) -> list[int]:
        return [self.worker.proc.pid]

    def make_cold(self) -> None:
        requests.post(self.store.url + "/admin/reset", timeout=120).raise_for_status()


class LlamaCppPythonServer(System):
    """llama-cpp-python's own server with every model in one --config_file; it loads one at a time."""

    key = "llama_cpp.server"
    label = "llama_cpp.server"

    def __init__(self):
        self.peer: Peer | None = None
        try:
            import llama_cpp

            self.version = f"llama-cpp-python {llama_cpp.__version__}"
        except ImportError:
            self.version = ""

    def unavailable(self) -> str | None:
        try:
            import llama_cpp.server.app  # noqa: F401  (fastapi, uvicorn and friends: the [bench] extra)
        except ImportError as err:
            return f"not installed ({err.name}): pip install -e '.[bench]'"
        return None

    def start(self, models: list[Path], workdir: Path, threads: int) -> None:
        port = free_port()
        # interrupt_requests: by default a new request cuts the stream in progress; streams must finish here.
        config = {"host": "127.0.0.1", "port": port, "interrupt_requests": False, "models": [
            {"model": str(m), "model_alias": self.model_id(m), "n_ctx": N_CTX, "n_threads": threads,
             "n_threads_batch": threads, "verbose": False} for m in models]}
        config_path = workdir / "llama_cpp_server.json"
        config_path.write_text(json.dumps(config))
        self.peer = Peer([sys.executable, "-m", "llama_cpp.server", "--config_file", str(config_path)],
                         workdir / "llama_cpp_server.log", port, "/v1/models").start()

    def stop(self) -> None:
        if self.peer:
            self.peer.stop()

    @property
    def url(self) -> str:
        return self.peer.url

    def session_ids(self) -> list[int]:
        return [self.peer.proc.pid]


class LlamaServerRouter(System):
    """llama.cpp's llama-server in router mode: one child server per loaded model, at most models_max."""

    def __init__(self, models_max: int, binary: Path = LLAMA_SERVER):
        self.models_max = models_max
        self.binary = binary
        self.key = f"llama-server-{models_max}"
        self.label = f"llama-server router, models-max {models_max}"
        self.peer: Peer | None = None
        self.version = ""

    def unavailable(self) -> str | None:
        if not os.access(self.binary, os.X_OK):
            return f"no binary at {self.binary}: run benchmarks/build_llama_server.sh (about 12 minutes)"
        if not self.version:
            out = subprocess.run([str(self.binary), "--version"], capture_output=True, text=True, timeout=30)
            self.version = "llama-server " + " ".join((out.stdout + out.stderr).split())[:80]
        return None

    def start(self, models: list[Path], workdir: Path, threads: int) -> None:
        port = free_port()
        self.peer = Peer([str(self.binary), "--models-dir", str(models[0].parent), "--models-max",
                          str(self.models_max), "-np", "8", "-c", str(N_CTX), "-t", str(threads), "-tb", str(threads),
                          "--host", "127.0.0.1", "--port", str(port), "--no-webui"],
                         workdir / f"{self.key}.log", port, "/v1/models").start()

    def stop(self) -> None:
        if self.peer:
            self.peer.stop()

    @property
    def url(self) -> str:
        return self.peer.url

    def model_id(self, path: Path) -> str:
        return path.stem  # the router names each file of --models-dir by its stem

    def session_ids(self) -> list[int]:
        return [self.peer.proc.pid]


def _git_version() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        return f"model-swap {out.stdout.strip() or 'unknown'}"
    except OSError:
        return "model-swap (no git)"


def all_systems() -> list[System]:
    """Every system the suite knows, in table order."""
    return [ModelSwap(), LlamaCppPythonServer(), LlamaServerRouter(1), LlamaServerRouter(2)]
