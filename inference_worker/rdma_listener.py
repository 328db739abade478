"""The worker's RDMA listener: a helper process lands models in the cache; the worker supervises it.

Why a helper process: pyverbs 56 holds the GIL while it waits for a connection (get_request),
which in a thread would stall the whole worker. The helper (`python -m inference_worker.rdma_listener`)
opens a ModelCache on the same directory and lands every file through ModelCache.receive, so the
bytes are checked and published exactly as on the HTTP path. It writes one JSON line per transfer
on stdout; the worker counts those in its metrics and marks the model as just used.

The helper's temporary files have a prefix of their own (RDMA_PARTIAL_PREFIX): SIGTERM unwinds a
transfer, so the cache deletes its file, and a helper killed outright leaves one that the next
helper deletes when it starts (only one runs at a time).
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
from typing import TYPE_CHECKING, Iterable, TextIO

from inference_worker.config import WorkerConfig
from inference_worker.metrics import WorkerMetrics
from inference_worker.storage import PARTIAL_PREFIX, ModelCache, Receipt
from model_swap.errors import ApiError
from model_swap.rdma.protocol import DEFAULT_CHUNK, DEFAULT_DEPTH, DEFAULT_IDLE_TIMEOUT_S

if TYPE_CHECKING:
    from model_swap.rdma.verbs import VerbsListener

MODULE = "inference_worker.rdma_listener"
log = logging.getLogger(MODULE)  # also when run as __main__

TOKEN_ENV = "MODEL_SWAP_RDMA_TOKEN"  # the token travels by environment, never on a command line
RDMA_PARTIAL_PREFIX = PARTIAL_PREFIX + "rdma-"  # still under PARTIAL_PREFIX: the worker's start clears these too
EXIT_UNAVAILABLE = 3  # no pyverbs or no RDMA device: restarting cannot help, so the worker does not
EXIT_RETRY = 4  # cannot listen now (address in use, device not up yet, listener broken): restart later
ACCEPT_FAILURES_BEFORE_RESTART = 5  # in a row: the listening id itself may be broken
PR_SET_PDEATHSIG = 1


class DisabledListener:
    """Stands in when RDMA cannot run: the worker serves model transfers over HTTP only."""

    enabled = False  # the same attributes as RdmaListener: whether it listens now, and why not

    def __init__(self, reason: str):
        self.reason = reason

    def stop(self) -> None:
        """Nothing runs, so nothing stops."""


class RdmaListener:
    """Runs the helper, restarts it if it dies, and records what it reports."""

    first_restart_delay_s = 1.0
    max_restart_delay_s = 60.0

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
        self.reason: str | None = "the listener process is starting"  # why it is not listening; None if it is
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        # The supervisor thread starts the helper: the helper's parent-death signal follows this thread.
        self._thread = threading.Thread(target=self._supervise, name="rdma-listener", daemon=True)

    @property
    def enabled(self) -> bool:
        """Whether the helper is listening right now."""
        return self.reason is None

    def start(self) -> None:
        """Start supervising."""
        self._thread.start()

    def _supervise(self) -> None:
        delay = self.first_restart_delay_s
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
            if self.reason is None:
                self.reason = f"the listener process exited with status {code}"
            if self._stopping.is_set():
                return
            if code == EXIT_UNAVAILABLE:
                log.warning("[rdma] listener on %s cannot run (see above); model transfers use HTTP only",
                            self.address)
                return
            if time.monotonic() - started > 60:  # it ran a good while: this is a fresh failure
                delay = self.first_restart_delay_s
            if code == EXIT_RETRY:
                log.warning("[rdma] cannot listen on %s now (see above); trying again in %gs", self.address, delay)
            else:
                log.error("[rdma] listener process exited with status %s; restarting in %gs", code, delay)
            self._stopping.wait(delay)
            delay = min(delay * 2, self.max_restart_delay_s)

    def _record(self, line: str) -> None:
        """Count one transfer the helper reported; a bad line is logged, never fatal to supervision."""
        try:
            event = json.loads(line)
            if event["event"] == "listening":
                self.reason = None
            elif event["event"] == "not_listening":
                self.reason = str(event["message"])
            elif event["event"] == "received":
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
        self.reason = "stopped"
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


class RdmaCacheSink:
    """The cache as the receiver's sink, with temporary files under RDMA_PARTIAL_PREFIX."""

    def __init__(self, cache: ModelCache):
        self.cache = cache

    def check_room(self, size: int | None) -> None:
        """Refuse a model that cannot fit, before any data moves."""
        self.cache.check_room(size)

    def receive(self, name: str, blocks: Iterable[bytes], size: int | None, sha256: str | None) -> Receipt:
        """Land one file through the cache."""
        return self.cache.receive(name, blocks, size, sha256, partial_prefix=RDMA_PARTIAL_PREFIX)


def remove_stale_partials(cache: ModelCache) -> int:
    """Delete the temporary files of an earlier helper that was killed mid-transfer; return how many."""
    stale = list(cache.root.glob(RDMA_PARTIAL_PREFIX + "*"))
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.warning("[rdma] removed %d partial file(s) left by an earlier listener", len(stale))
    return len(stale)


def exit_on_sigterm() -> None:
    """Make SIGTERM (the worker's stop, or its death) unwind like sys.exit, so temp files are deleted."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


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


def _cannot_listen(events: TextIO, err: ApiError, status: int) -> int:
    """Say why the helper cannot listen, in its log and to the worker; return its exit status."""
    log.warning("[rdma] %s: %s", err.code, err.message)
    _emit(events, {"event": "not_listening", "code": err.code, "message": err.message})
    return status


def serve_one(listener: "VerbsListener", sink: RdmaCacheSink, token: str | None, timeout_s: float,
              events: TextIO) -> bool:
    """Accept one connection and land its file, reporting the outcome; return False if accepting failed."""
    from model_swap.rdma.protocol import receive_file

    try:
        channel = listener.accept()
    except ApiError as err:
        log.warning("[rdma] %s: %s", err.code, err.message)
        return False
    except Exception:  # a bug or a pyverbs surprise must not end the listener
        log.exception("[rdma] accepting a connection failed unexpectedly")
        return False
    started = time.perf_counter()
    try:
        receipt = receive_file(channel, sink, token=token, timeout_s=timeout_s)
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
        try:
            channel.close()
        except Exception:
            log.exception("[rdma] closing a connection failed")
    return True


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
    p.add_argument("--timeout", type=float, default=DEFAULT_IDLE_TIMEOUT_S, help="longest silence from a sender")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    configure_logging(args.log_level)  # before pyverbs, whose import configures logging
    exit_on_sigterm()  # before the parent-death signal can arrive
    _exit_with_parent(args.parent_pid)
    from model_swap.rdma.protocol import ChannelSpec
    from model_swap.rdma.verbs import VerbsListener, claim_stdout, rdma_devices

    events = claim_stdout()

    cache = ModelCache(args.cache_dir, args.max_model_bytes, args.reserve_disk_bytes)
    remove_stale_partials(cache)
    try:
        rdma_devices()
    except ApiError as err:  # no pyverbs, no device: a restart would fail the same way
        return _cannot_listen(events, err, EXIT_UNAVAILABLE)
    try:
        listener = VerbsListener(args.host, args.port, ChannelSpec.for_receiver(args.chunk_bytes, args.depth))
    except ApiError as err:  # address in use, device not up yet: worth another try later
        return _cannot_listen(events, err, EXIT_RETRY)
    log.info("[rdma] listening on %s:%d (devices: %s)", args.host, args.port, ", ".join(listener.devices))
    _emit(events, {"event": "listening", "devices": listener.devices})
    token = os.environ.get(TOKEN_ENV) or None
    sink, failures = RdmaCacheSink(cache), 0
    while failures < ACCEPT_FAILURES_BEFORE_RESTART:
        failures = 0 if serve_one(listener, sink, token, args.timeout, events) else failures + 1
    log.error("[rdma] %d connections in a row could not be accepted; restarting the listener", failures)
    listener.close()
    return EXIT_RETRY


if __name__ == "__main__":
    sys.exit(main())
