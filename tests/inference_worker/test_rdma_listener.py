"""The worker's RDMA listener: its helper process, the supervisor that restarts it, and its cache sink.

Without an RDMA device the helper exits "unavailable" and the worker serves HTTP only; the supervisor
is driven by stand-in helpers that print the same events and exit with the same codes. A transfer
over a real device is tested in tests/model_swap/test_rdma_verbs.py.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inference_worker import create_app
from inference_worker.config import WorkerConfig
from model_swap.errors import ApiError
from model_swap.rdma.testing_support import HAS_PYVERBS, without_device
from model_swap.testing import REPO, free_port


@without_device
def test_worker_with_rdma_port_and_no_device_warns_once_and_serves_http(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    config = WorkerConfig(cache_dir=tmp_path / "cache", rdma_port=free_port())
    app = create_app(config)
    listener = app.extensions["worker"]["rdma"]
    assert listener.enabled is False
    warnings = [r for r in caplog.records
                if r.name == "inference_worker.rdma_listener" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "rdma_unavailable" in warnings[0].getMessage() and "HTTP" in warnings[0].getMessage()
    assert app.test_client().get("/health").status_code == 200
    listener.stop()


@without_device
def test_listener_helper_without_device_clears_old_partials_and_exits_unavailable(tmp_path: Path) -> None:
    from inference_worker.rdma_listener import EXIT_UNAVAILABLE, RDMA_PARTIAL_PREFIX

    (tmp_path / (RDMA_PARTIAL_PREFIX + "left-by-a-killed-helper")).write_bytes(b"GGUF")
    (tmp_path / ".incoming-http-upload").write_bytes(b"GGUF")  # the worker's own: not the helper's to delete
    done = subprocess.run([sys.executable, "-m", "inference_worker.rdma_listener", "--cache-dir", str(tmp_path),
                           "--host", "127.0.0.1", "--port", str(free_port()), "--max-model-bytes", "1000000",
                           "--reserve-disk-bytes", "0", "--parent-pid", str(os.getpid())],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_UNAVAILABLE
    assert [json.loads(line)["code"] for line in done.stdout.splitlines()] == ["rdma_unavailable"]
    assert ("no RDMA device" if HAS_PYVERBS else "pyverbs is not installed") in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".incoming-http-upload"]


def test_listener_supervisor_counts_what_the_helper_reports(tmp_path: Path) -> None:
    from inference_worker.metrics import WorkerMetrics
    from inference_worker.rdma_listener import EXIT_UNAVAILABLE, RdmaListener
    from inference_worker.storage import ModelCache

    cache, metrics = ModelCache(tmp_path / "cache", 1 << 30, 0), WorkerMetrics()
    listener = RdmaListener(WorkerConfig(cache_dir=tmp_path / "cache", rdma_port=free_port()), cache, metrics)
    events = [{"event": "listening", "devices": ["x"]}, {"event": "received", "name": "a.gguf", "size": 5},
              {"event": "failed", "code": "digest_mismatch", "message": "m"}, {"no": "event"}]
    script = "; ".join(["import json, sys", *(f"print(json.dumps({e!r}))" for e in events),
                        "print('not json')", f"sys.exit({EXIT_UNAVAILABLE})"])
    listener._argv = [sys.executable, "-c", script]  # a stand-in helper: same pipe, same exit codes
    listener.start()
    listener._thread.join(10)
    assert not listener._thread.is_alive()  # "unavailable" is not restarted
    assert listener.enabled is False and "status 3" in listener.reason
    sample = metrics.registry.get_sample_value
    assert sample("worker_model_receives_total", {"result": "ok"}) == 1
    assert sample("worker_model_receives_total", {"result": "error"}) == 1
    assert sample("worker_model_bytes_received_total") == 5
    listener.stop()


def test_listener_supervisor_restarts_a_crashed_helper(tmp_path: Path) -> None:
    from inference_worker.metrics import WorkerMetrics
    from inference_worker.rdma_listener import EXIT_UNAVAILABLE, RdmaListener
    from inference_worker.storage import ModelCache

    runs = tmp_path / "runs"
    listener = RdmaListener(WorkerConfig(cache_dir=tmp_path / "cache", rdma_port=free_port()),
                            ModelCache(tmp_path / "cache", 1 << 30, 0), WorkerMetrics())
    script = (f"import sys, pathlib; p = pathlib.Path({str(runs)!r}); p.write_text(p.read_text() + 'x' "
              f"if p.exists() else 'x'); sys.exit(1 if len(p.read_text()) < 2 else {EXIT_UNAVAILABLE})")
    listener._argv = [sys.executable, "-c", script]
    listener.start()
    listener._thread.join(15)
    assert runs.read_text() == "xx"  # crashed once, restarted, then reported unavailable
    listener.stop()


def test_listener_supervisor_retries_a_helper_that_cannot_listen_yet(tmp_path: Path, monkeypatch) -> None:
    from inference_worker.metrics import WorkerMetrics
    from inference_worker.rdma_listener import EXIT_RETRY, RdmaListener
    from inference_worker.storage import ModelCache

    monkeypatch.setattr(RdmaListener, "first_restart_delay_s", 0.05)
    runs = tmp_path / "runs"
    listener = RdmaListener(WorkerConfig(cache_dir=tmp_path / "cache", rdma_port=free_port()),
                            ModelCache(tmp_path / "cache", 1 << 30, 0), WorkerMetrics())
    # First run: the address is in use, try later. Second run: listening, until stopped.
    script = "\n".join([
        "import json, pathlib, sys, time",
        f"p = pathlib.Path({str(runs)!r}); p.write_text(p.read_text() + 'x' if p.exists() else 'x')",
        "if len(p.read_text()) == 1:",
        "    print(json.dumps({'event': 'not_listening', 'code': 'rdma_unavailable', 'message': 'in use'}))",
        f"    sys.exit({EXIT_RETRY})",
        "print(json.dumps({'event': 'listening', 'devices': ['x']}), flush=True)",
        "time.sleep(60)"])
    listener._argv = [sys.executable, "-c", script]
    assert listener.enabled is False
    listener.start()
    deadline = time.monotonic() + 15
    while not listener.enabled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert listener.enabled and runs.read_text() == "xx"
    listener.stop()
    assert listener.enabled is False


def test_rdma_temp_files_have_their_own_prefix(tmp_path: Path) -> None:
    from inference_worker.rdma_listener import RDMA_PARTIAL_PREFIX, RdmaCacheSink
    from inference_worker.storage import ModelCache

    cache = ModelCache(tmp_path / "cache", 1 << 30, 0)
    seen: list[list[str]] = []

    def blocks():
        yield b"GGUF" + bytes(1000)
        seen.append([p.name for p in cache.root.iterdir()])
        yield bytes(1000)

    receipt = RdmaCacheSink(cache).receive("a.gguf", blocks(), 2004, None)
    assert receipt.size == 2004
    assert len(seen[0]) == 1 and seen[0][0].startswith(RDMA_PARTIAL_PREFIX)
    assert [p.name for p in cache.root.iterdir()] == ["a.gguf"]


def test_sigterm_mid_transfer_leaves_no_temp_file(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    script = "\n".join([
        "import sys, time",
        "from inference_worker.rdma_listener import RdmaCacheSink, exit_on_sigterm",
        "from inference_worker.storage import ModelCache",
        "exit_on_sigterm()",
        "def blocks():",
        "    yield b'GGUF' + bytes(4096)",
        "    print('receiving', flush=True)",
        "    time.sleep(60)",
        "    yield b''",
        f"RdmaCacheSink(ModelCache({str(cache_dir)!r}, 1 << 30, 0)).receive('a.gguf', blocks(), None, None)"])
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "receiving\n"
        assert len(list(cache_dir.iterdir())) == 1  # the temporary file, mid-transfer
        proc.terminate()  # what the worker's stop() and the parent-death signal send
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()
    assert list(cache_dir.iterdir()) == []


class StubListener:
    """Stands in for VerbsListener in serve_one: accept() raises what it is given."""

    def __init__(self, error: Exception):
        self.error = error

    def accept(self):
        raise self.error


@pytest.mark.parametrize("error", [ApiError(502, "rdma_connect_failed", "m"), RuntimeError("a pyverbs surprise")])
def test_listener_survives_a_failed_accept(tmp_path: Path, error: Exception) -> None:
    from inference_worker.rdma_listener import RdmaCacheSink, serve_one
    from inference_worker.storage import ModelCache

    events = io.StringIO()
    sink = RdmaCacheSink(ModelCache(tmp_path / "cache", 1 << 30, 0))
    assert serve_one(StubListener(error), sink, None, 1.0, events) is False
    assert events.getvalue() == ""
