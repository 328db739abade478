"""scripts/serve.sh as a new user runs it: --help, a folder per instance, honest failures, both stop together."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from model_swap.testing import free_port

REPO = Path(__file__).resolve().parents[2]
SERVE = REPO / "scripts" / "serve.sh"

pytestmark = pytest.mark.slow


def run_briefly(*args: str) -> subprocess.CompletedProcess:
    """Run serve.sh with args; if it starts serving instead of answering, stop everything it started."""
    proc = subprocess.Popen([str(SERVE), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=30)
        pytest.fail(f"serve.sh {' '.join(args)} did not return: it started serving")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_help_prints_usage_and_starts_nothing():
    proc = run_briefly("--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("Usage: scripts/serve.sh") and "STORE_PORT" in proc.stdout
    assert "[setup]" not in proc.stderr  # nothing was set up or started
    bad = run_briefly("--bogus")
    assert bad.returncode == 2 and "Usage:" in bad.stderr


def test_llama_install_note_says_whether_the_wheel_is_cached():
    proc = subprocess.run(["bash", "-c", f"source {REPO}/scripts/bootstrap.sh; llama_install_note"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    cached = subprocess.run([f"{REPO}/.venv/bin/python", "-m", "pip", "cache", "list", "llama_cpp_python*"],
                            capture_output=True, text=True, timeout=60).stdout
    expected = "cache" if "llama_cpp_python-" in cached else "compiles"
    assert expected in proc.stderr, proc.stderr


class Serve:
    """serve.sh on free ports, its stderr collected."""

    def __init__(self, tmp_path: Path, **env: str):
        self.store_port, self.worker_port = free_port(), free_port()
        self.env = dict(os.environ, STORE_PORT=str(self.store_port), WORKER_PORT=str(self.worker_port), **env)
        for key in ("MODEL_CACHE_DIR", "RUN_DIR", "MODELS_DIR"):
            self.env.pop(key, None)
        self.err_path = tmp_path / "serve.err"
        self.proc = subprocess.Popen([str(SERVE)], env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.err_path, "w"), start_new_session=True)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.stderr():
            assert self.proc.poll() is None or text in self.stderr(), self.stderr()
            assert time.monotonic() < deadline, f"no {text!r} in:\n{self.stderr()}"
            time.sleep(0.2)

    def pid_of(self, service: str) -> int:
        port = self.store_port if service == "model-store-server" else self.worker_port
        out = subprocess.run(["pgrep", "-f", "--", f"{service} --port {port}"], capture_output=True, text=True).stdout.split()
        assert out, service
        return int(out[0])

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        shutil.rmtree(REPO / "run" / str(self.store_port), ignore_errors=True)
        shutil.rmtree(REPO / "model_cache" / str(self.store_port), ignore_errors=True)
        for folder in ("run", "model_cache"):  # the parents too, if this test made them
            try:
                (REPO / folder).rmdir()
            except OSError:
                pass


def test_each_instance_has_its_own_folders_and_a_dying_service_stops_both(tmp_path):
    serve = Serve(tmp_path)
    try:
        serve.wait_for("Ready.")
        assert (REPO / "run" / str(serve.store_port) / "store.log").exists()
        assert (REPO / "model_cache" / str(serve.store_port) / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()
        os.kill(serve.pid_of("inference-worker"), signal.SIGKILL)
        assert serve.proc.wait(30) != 0
        err = serve.stderr()
        assert "the worker exited" in err and "stopping the store" in err
        assert subprocess.run(["pgrep", "-f", "--", f"--port {serve.store_port}"], capture_output=True).returncode == 1
    finally:
        serve.close()


def test_a_failed_first_request_says_why_and_what_to_do(tmp_path):
    serve = Serve(tmp_path, MAX_CACHE_BYTES="1000")  # SmolLM2 cannot fit: the first request is refused
    try:
        serve.wait_for("first request failed")
        err = serve.stderr()
        assert "model_too_large" in err and "MAX_CACHE_BYTES" in err
        assert "Ready." not in err
    finally:
        serve.close()
