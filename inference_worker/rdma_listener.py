"""The worker's RDMA listener: a helper process lands models in the cache; the worker supervises it.

Why a helper process: pyverbs 56 holds the GIL while it waits for a connection (get_request),
which in a thread would stall the whole worker. The helper (`python -m inference_worker.rdma_listener`)
opens a ModelCache on the same directory and lands every file through ModelCache.receive, so the
bytes are checked and published exactly as on the HTTP path. It writes one JSON line per transfer
on stdout; the worker counts those in its metrics and marks the model as just used.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from inference_worker.config import WorkerConfig
from inference_worker.metrics import WorkerMetrics
from inference_worker.storage import ModelCache
from model_swap.errors import ApiError
from model_swap.rdma.protocol import DEFAULT_CHUNK, DEFAULT_DEPTH, DEFAULT_TIMEOUT_S

if TYPE_CHECKING:
    from model_swap.rdma.verbs import VerbsListener

MODULE = "inference_worker.rdma_listener"
log = logging.getLogger(MODULE)  # also when run as __main__

TOKEN_ENV = "MODEL_SWAP_RDMA_TOKEN"  # the token travels by environment, never on a command line
EXIT_UNAVAILABLE = 3  # the helper cannot listen (no device, address in use): do not restart it
PR_SET_PDEATHSIG = 1


class DisabledListener:
    """Stands in when RDMA cannot run: the worker serves model transfers over HTTP only."""

    enabled = False

    def __init__(self, reason: str):
        self.reason = reason

    def stop(self) -> None:
        """Nothing runs, so nothing stops."""


class RdmaListener:
    """Runs the helper, restarts it if it dies, and records what it reports."""

    enabled = True

    def __init__(self, config: WorkerConfig, cache: ModelCache, metrics: WorkerMetrics):
        self.address = f"{config.host}:{config.rdma_port}"
        self._argv = [sys.executable, "-m", MODULE, "--cache-dir", str(cache.root), "--host", config.host,
                      "--port", str(config.rdma_port), "--max-model-bytes", str(config.max_model_bytes),
                      "--reserve-disk-bytes", str(config.reserve_disk_bytes), "--parent-pid", str(os.getpid()),
                      "--log-level", config.log_level]
        self._env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        if config.token:
            self._env[TOKEN_ENV] = config.token
        self._cache = cache
        self._metrics = metrics
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        # The supervisor thread starts the helper: the helper's parent-death signal follows this thread.
        self._thread = threading.Thread(target=self._supervise, name="rdma-listener", daemon=True)

    def start(self) -> None:
        """Start supervising."""
        self._thread.start()

    def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            started = time.monotonic()
            with self._lock:
                if self._stopping.is_set():
                    return
                self._proc = subprocess.Popen(self._argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                              env=self._env, text=True)
            for line in self._proc.stdout:
                self._record(line)
            code = self._proc.wait()
            if self._stopping.is_set():
                return
            if code == EXIT_UNAVAILABLE:
                log.warning("[rdma] listener on %s cannot run (see above); model transfers use HTTP only",
                            self.address)
                return
            backoff = 1.0 if time.monotonic() - started > 60 else min(backoff * 2, 60.0)
            log.error("[rdma] listener process exited with status %s; restarting in %.0fs", code, backoff)
            self._stopping.wait(backoff)

    def _record(self, line: str) -> None:
        """Count one transfer the helper reported; a bad line is logged, never fatal to supervision."""
        try:
            event = json.loads(line)
            if event["event"] == "received":
                self._metrics.receives.labels("ok").inc()
                self._metrics.bytes_received.inc(event["size"])
                self._cache.touch(event["name"])
            elif event["event"] == "failed":
                self._metrics.receives.labels("error").inc()
        except (ValueError, KeyError, TypeError):
            log.warning("[rdma] listener wrote an unreadable line: %r", line[:200])

    def stop(self) -> None:
        """Stop the helper and the supervisor."""
        self._stopping.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._thread.join(5)


def start_rdma_listener(config: WorkerConfig, cache: ModelCache,
                        metrics: WorkerMetrics) -> RdmaListener | DisabledListener:
    """Start the listener if pyverbs and a device are present; otherwise warn once. Never raises."""
    try:
        from model_swap.rdma.verbs import rdma_devices

        devices = rdma_devices()
    except ApiError as err:
        log.warning("[rdma] WORKER_RDMA_PORT=%s is set but RDMA is unavailable (%s: %s); "
                    "the worker starts anyway and receives models over HTTP only", config.rdma_port, err.code,
                    err.message)
        return DisabledListener(err.message)
    except Exception as err:  # a broken pyverbs install must not stop the worker either
        log.warning("[rdma] WORKER_RDMA_PORT=%s is set but probing RDMA failed (%s: %s); "
                    "the worker receives models over HTTP only", config.rdma_port, err.__class__.__name__, err)
        return DisabledListener(str(err))
    listener = RdmaListener(config, cache, metrics)
    listener.start()
    log.info("[rdma] listener starting on %s (devices: %s)", listener.address, ", ".join(devices))
    return listener


# ---- the helper process ----------------------------------------------------------------------------


def _emit(events: TextIO, event: dict) -> None:
    """Report to the worker on the events pipe (the log is on stderr)."""
    events.write(json.dumps(event) + "\n")
    events.flush()


def _exit_with_parent(parent_pid: int) -> None:
    """Have the kernel send SIGTERM when the worker dies, so no listener outlives it (Linux only)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError) as err:
        log.warning("[rdma] cannot tie the listener's life to the worker's: %s", err)
    if os.getppid() != parent_pid:  # the worker died before prctl took effect
        sys.exit(0)


def serve_one(listener: "VerbsListener", cache: ModelCache, token: str | None, timeout_s: float,
              events: TextIO) -> None:
    """Accept one connection and land its file; report the outcome on the events pipe."""
    from model_swap.rdma.protocol import receive_file

    try:
        channel = listener.accept()
    except ApiError as err:
        log.warning("[rdma] %s", err.message)
        return
    started = time.perf_counter()
    try:
        receipt = receive_file(channel, cache, token=token, timeout_s=timeout_s)
    except ApiError as err:
        log.warning("[rdma] transfer failed: %s (%s)", err.code, err.message)
        _emit(events, {"event": "failed", "code": err.code, "message": err.message})
    except Exception:
        log.exception("[rdma] transfer failed unexpectedly")
        _emit(events, {"event": "failed", "code": "worker_error", "message": "unexpected error"})
    else:
        seconds = time.perf_counter() - started
        log.info("[rdma] received %s (%d bytes) in %.1fms (%.2f GB/s)", receipt.name, receipt.size, seconds * 1000,
                 receipt.size / seconds / 1e9 if seconds else 0.0)
        _emit(events, {"event": "received", "name": receipt.name, "size": receipt.size, "sha256": receipt.sha256})
    finally:
        channel.close()


def main(argv: list[str] | None = None) -> int:
    """The helper: listen, then land one transfer after another until terminated."""
    from model_swap.serving import configure_logging

    p = argparse.ArgumentParser(prog="python -m inference_worker.rdma_listener",
                                description="receive models over RDMA into the worker's cache (run by the worker)")
    p.add_argument("--cache-dir", type=Path, required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-model-bytes", type=int, required=True)
    p.add_argument("--reserve-disk-bytes", type=int, required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK)
    p.add_argument("--depth", type=int, default=DEFAULT_DEPTH, help="receive buffers, i.e. credits")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="longest silence from a sender")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    configure_logging(args.log_level)  # before pyverbs, whose import configures logging
    _exit_with_parent(args.parent_pid)
    from model_swap.rdma.protocol import ChannelSpec
    from model_swap.rdma.verbs import VerbsListener, claim_stdout

    events = claim_stdout()

    cache = ModelCache(args.cache_dir, args.max_model_bytes, args.reserve_disk_bytes)
    try:
        listener = VerbsListener(args.host, args.port, ChannelSpec.for_receiver(args.chunk_bytes, args.depth))
    except ApiError as err:
        log.warning("[rdma] %s: %s", err.code, err.message)
        return EXIT_UNAVAILABLE
    log.info("[rdma] listening on %s:%d (devices: %s)", args.host, args.port, ", ".join(listener.devices))
    _emit(events, {"event": "listening", "devices": listener.devices})
    token = os.environ.get(TOKEN_ENV) or None
    while True:
        serve_one(listener, cache, token, args.timeout, events)


if __name__ == "__main__":
    sys.exit(main())
