"""The smoke-test scripts: the four disk-policy scripts and the memory-tier one pass against real
services, and each fails loudly when the store behaves differently from what it expects."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest
import requests

from inference_worker.testing.tiny_gguf import write_tiny_gguf
from model_swap.testing import ServiceProcess, free_port

REPO = Path(__file__).resolve().parents[2]
SMOKE_DIR = REPO / "smoke_tests"
TINY = {"MODEL_A": "tiny-a.gguf", "MODEL_B": "tiny-b.gguf", "MODEL_C": "tiny-c.gguf"}
SCRIPT_TIMEOUT_S = 180

pytestmark = pytest.mark.slow


def _load_plot_run():
    """Import benchmarks/plot_run.py by path (benchmarks/ is not a package)."""
    if "plot_run" in sys.modules:
        return sys.modules["plot_run"]
    spec = importlib.util.spec_from_file_location("plot_run", REPO / "benchmarks" / "plot_run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["plot_run"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    """A models dir with three tiny generated models."""
    root = tmp_path_factory.mktemp("models")
    for seed, name in enumerate(TINY.values(), start=1):
        write_tiny_gguf(root / name, seed=seed)
    return root


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Iterator[ServiceProcess]:
    """One worker shared by the stores below (each script resets it first)."""
    tmp = tmp_path_factory.mktemp("worker")
    service = ServiceProcess("inference_worker", ["--cache-dir", str(tmp / "cache")], tmp / "worker.log",
                             env={"MAX_LOADED_MODELS": "1"}).start()
    yield service
    service.stop()


def _start_store(worker: ServiceProcess, models: Path, policy: str, tmp: Path) -> ServiceProcess:
    return ServiceProcess("model_store_server", ["--models-dir", str(models), "--worker-url", worker.url,
                                                 "--cache-policy", policy, "--max-cache-size", "2",
                                                 "--ttl-seconds", "1"], tmp / f"store-{policy}.log").start()


def _run(cmd: list[str], env_extra: dict[str, str], timeout_s: float = SCRIPT_TIMEOUT_S) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    return subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout_s)


def test_run_all_passes_every_policy_with_tiny_models(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_gguf(models / TINY["MODEL_A"], seed=1)
    write_tiny_gguf(models / TINY["MODEL_B"], seed=2)  # MODEL_C is left for run_all.sh to generate
    out = tmp_path / "out"

    result = _run(["bash", str(SMOKE_DIR / "run_all.sh"), str(out)],
                  {"MODELS_DIR": str(models), "TTL_SECONDS": "3", "KEEP_ALIVE_SECONDS": "2", **TINY}, timeout_s=300)

    assert result.returncode == 0, result.stdout[-6000:]
    assert (models / TINY["MODEL_C"]).is_file()
    plot_run = _load_plot_run()
    for policy in ("lru", "no-evict", "ttl", "lru-ttl"):
        assert f"PASS  {policy} (" in result.stdout
        text = (out / f"{policy}.txt").read_text()
        assert f"PASS: {policy} smoke test" in text
        run = plot_run.parse_run(text)  # the chart script reads what the scripts print
        assert run.policy == policy
        assert [s.action for s in run.steps] == [s.expected for s in run.steps]
    # The memory tier needs a worker that holds several models; against one that does not, it says so.
    if "SKIP  memory (the worker holds one model at a time)" not in result.stdout:
        assert "PASS  memory (" in result.stdout
        run = plot_run.parse_run((out / "memory.txt").read_text())
        assert run.policy == "memory-tier"
        assert [s.action for s in run.steps] == [s.expected for s in run.steps]
        assert [s.unloaded for s in run.steps][5:7] == [(TINY["MODEL_B"],), (TINY["MODEL_A"],)]
    assert "all policies passed" in result.stdout


REAL_MODELS = REPO / "models"


@pytest.mark.skipif(not (REAL_MODELS / "gemma-3-270m-q4_k_m.gguf").is_file()
                    or not (REAL_MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file(),
                    reason="the real models are not in models/ (./scripts/test.sh fetches them)")
def test_run_all_passes_every_policy_with_the_real_models(tmp_path: Path) -> None:
    """The README's smoke run: the two real models plus a generated third one."""
    result = _run(["bash", str(SMOKE_DIR / "run_all.sh"), str(tmp_path)], {"MODELS_DIR": str(REAL_MODELS)},
                  timeout_s=600)
    assert result.returncode == 0, result.stdout[-6000:]
    for policy in ("lru", "no-evict", "ttl", "lru-ttl"):
        assert f"PASS  {policy} (" in result.stdout


@pytest.mark.parametrize(
    ("script", "wrong_policy", "failing_step", "detail"),
    [
        # lru expects C to evict A; no-evict refuses C.
        ("test_cache_smoke.sh", "no-evict", "step 4 (C third model evicts LRU A", "got http 503 error=cache_full"),
        # no-evict expects C refused; lru admits it.
        ("test_no_evict_smoke.sh", "lru", "step 4 (C refused, cache full", "expected http 503 cache_full"),
        # ttl expects the timer to sweep C and A; no-evict keeps them.
        ("test_ttl_smoke.sh", "no-evict", "after step 3:", "still holds tiny-c.gguf, tiny-a.gguf past the TTL"),
        # lru-ttl expects the timer to sweep expired A and B; lru keeps both.
        ("test_lru_ttl_smoke.sh", "lru", "after step 4:", "still holds tiny-a.gguf, tiny-b.gguf past the TTL"),
    ],
)
def test_script_names_the_failing_step_against_a_store_with_another_policy(
        script: str, wrong_policy: str, failing_step: str, detail: str,
        worker: ServiceProcess, tiny_models: Path, tmp_path: Path) -> None:
    store = _start_store(worker, tiny_models, wrong_policy, tmp_path)
    try:
        result = _run(["bash", str(SMOKE_DIR / script)], {"STORE_URL": store.url, "TTL_SECONDS": "1", **TINY})
    finally:
        store.stop()

    assert result.returncode != 0, result.stdout
    fail_lines = [line for line in result.stdout.splitlines() if line.startswith("FAIL: ")]
    assert len(fail_lines) == 1, result.stdout
    assert fail_lines[0].startswith(f"FAIL: {failing_step}"), result.stdout
    assert detail in fail_lines[0]
    assert f"WARNING: the store reports policy={wrong_policy}" in result.stdout
    assert "PASS:" not in result.stdout


def test_script_fails_loudly_when_the_store_is_unreachable() -> None:
    result = _run(["bash", str(SMOKE_DIR / "test_cache_smoke.sh")],
                  {"STORE_URL": f"http://127.0.0.1:{free_port()}", **TINY}, timeout_s=60)

    assert result.returncode != 0
    assert "FAIL: reset: POST" in result.stdout
    assert "is the store running?" in result.stdout


def test_run_all_reports_missing_models_without_starting_services(tmp_path: Path) -> None:
    result = _run(["bash", str(SMOKE_DIR / "run_all.sh")], {"MODELS_DIR": str(tmp_path), **TINY}, timeout_s=60)

    assert result.returncode == 2
    assert f"{TINY['MODEL_A']} is not in {tmp_path}" in result.stdout
    assert "fetch_models" in result.stdout


def _ask(store: ServiceProcess, model: str) -> requests.Response:
    response = requests.post(f"{store.url}/user_request", json={"prompt": "hi", "model": model, "max_tokens": 4},
                             timeout=60)
    response.content  # drain the stream so the lease ends
    return response


@pytest.fixture
def store_over_fake_worker(tmp_path):
    """serve(max_loaded) -> URL of a store app (in-process, on a free port) whose worker is a FakeWorker."""
    from werkzeug.serving import make_server

    from tests.support.fake_worker import FakeWorker
    from tests.support.store_harness import fake_store

    servers = []

    def serve(max_loaded: int) -> str:
        app, _ = fake_store(tmp_path, FakeWorker(max_loaded=max_loaded), models=tuple(TINY.values()),
                            max_cache_size=3, keep_alive_seconds=1.0)
        server = make_server("127.0.0.1", free_port(), app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield serve
    for server in servers:
        server.shutdown()


def test_memory_tier_script_walks_its_steps_over_a_fake_worker(store_over_fake_worker) -> None:
    """The script's own logic (a fast seam); run_all.sh runs it against a real worker that holds two models."""
    url = store_over_fake_worker(2)
    result = _run(["bash", str(SMOKE_DIR / "test_memory_tier_smoke.sh")],
                  {"STORE_URL": url, "KEEP_ALIVE_SECONDS": "1", **TINY}, timeout_s=60)
    assert result.returncode == 0, result.stdout
    assert "PASS: memory-tier smoke test (8 steps)" in result.stdout
    run = _load_plot_run().parse_run(result.stdout)
    assert [s.action for s in run.steps] == [s.expected for s in run.steps]


def test_memory_tier_script_refuses_a_worker_with_room_for_one(store_over_fake_worker) -> None:
    url = store_over_fake_worker(1)
    result = _run(["bash", str(SMOKE_DIR / "test_memory_tier_smoke.sh")], {"STORE_URL": url, **TINY}, timeout_s=60)
    assert result.returncode != 0
    assert "FAIL: setup: the worker holds 1 model(s) at a time" in result.stdout
