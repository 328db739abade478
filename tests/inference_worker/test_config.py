"""Worker configuration: defaults, environment, flags, help, and clear refusals."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from inference_worker import create_app
from inference_worker.config import ConfigError, WorkerConfig, _build_parser, check_cache_dir, load_worker_config
from model_swap import __version__


def test_defaults():
    c = load_worker_config([], env={})
    assert (c.port, c.host, c.n_gpu_layers, c.n_ctx, c.token, c.rdma_port) == (8080, "127.0.0.1", -1, 2048, None, None)
    usable = len(os.sched_getaffinity(0))
    assert (c.n_threads, c.n_threads_batch) == (usable, usable)
    assert (c.memory_budget_bytes, c.max_loaded_models, c.unload_drain_timeout_s) == (None, 3, 30.0)
    assert (c.n_parallel, c.batch_invariant, c.flash_attn) == (4, False, False)


def test_environment_and_flags():
    env = {"MODEL_CACHE_DIR": "/tmp/x", "N_CTX": "512", "WORKER_TOKEN": "t", "N_THREADS": "3",
           "MEMORY_BUDGET_BYTES": "1000000", "MAX_LOADED_MODELS": "2", "UNLOAD_DRAIN_TIMEOUT_S": "1.5"}
    c = load_worker_config(["--n-gpu-layers", "0", "--n-threads-batch", "5"], env=env)
    assert (str(c.cache_dir), c.n_ctx, c.token, c.n_gpu_layers) == ("/tmp/x", 512, "t", 0)
    assert (c.n_threads, c.n_threads_batch, c.memory_budget_bytes) == (3, 5, 1_000_000)
    assert (c.max_loaded_models, c.unload_drain_timeout_s) == (2, 1.5)
    assert load_worker_config(["--memory-budget-bytes", "AUTO"], env=env).memory_budget_bytes is None
    assert load_worker_config([], env={"N_PARALLEL": "8"}).n_parallel == 8
    assert load_worker_config(["--n-parallel", "1"], env={"N_PARALLEL": "8"}).n_parallel == 1
    switches = load_worker_config([], env={"BATCH_INVARIANT": "1", "FLASH_ATTN": "1"})
    assert (switches.batch_invariant, switches.flash_attn) == (True, True)


@pytest.mark.parametrize("argv,fragment", [
    (["--port", "0"], "port"),
    (["--n-ctx", "abc"], "N_CTX"),
    (["--max-model-bytes", "0"], "max model bytes"),
    (["--host", "0.0.0.0"], "WORKER_TOKEN"),
    (["--n-threads", "0"], "N_THREADS"),
    (["--n-threads-batch", "x"], "N_THREADS_BATCH"),
    (["--memory-budget-bytes", "0"], "MEMORY_BUDGET_BYTES"),
    (["--memory-budget-bytes", "lots"], "MEMORY_BUDGET_BYTES"),
    (["--max-loaded-models", "0"], "MAX_LOADED_MODELS"),
    (["--unload-drain-timeout-s", "-1"], "UNLOAD_DRAIN_TIMEOUT_S"),
    (["--n-parallel", "0"], "N_PARALLEL"),
    (["--n-parallel", "65"], "N_PARALLEL"),
    (["--n-parallel", "two"], "N_PARALLEL"),
])
def test_invalid_settings_refused(argv, fragment):
    with pytest.raises(ConfigError) as err:
        load_worker_config(argv, env={})
    assert fragment in str(err.value)


def test_public_bind_allowed_with_token_or_explicit_flag():
    assert load_worker_config(["--host", "0.0.0.0", "--token", "t"], env={}).host == "0.0.0.0"
    assert load_worker_config(["--host", "0.0.0.0", "--insecure-no-token"], env={}).allow_insecure


def test_every_flag_has_a_description_default_and_variable():
    for action in _build_parser({})._actions:
        if action.dest in ("help", "version"):
            continue
        assert action.help and "default: " in action.help and "env " in action.help, action.option_strings


def test_settings_reach_the_registry(tmp_path):
    config = WorkerConfig(cache_dir=tmp_path, n_threads=1, n_threads_batch=2, memory_budget_bytes=12345,
                          max_loaded_models=2, unload_drain_timeout_s=4.0, n_ctx=64, n_parallel=3)
    registry = create_app(config).extensions["worker"]["registry"]
    assert (registry.settings.n_threads, registry.settings.n_threads_batch, registry.settings.n_ctx) == (1, 2, 64)
    assert registry.settings.n_parallel == 3
    assert (registry.budget.bytes, registry.max_loaded_models, registry.drain_timeout_s) == (12345, 2, 4.0)


def test_cache_dir_is_created_and_checked(tmp_path):
    check_cache_dir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory|cannot be created"):
        check_cache_dir(tmp_path / "file")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inference_worker", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("cache_dir,fragment", [("/proc/nope", "cannot be created"), ("/proc/self", "not writable")])
def test_bad_cache_dir_is_one_line_and_exit_2(cache_dir, fragment):
    proc = _run("--cache-dir", cache_dir)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and cache_dir in lines[0]
    assert "Traceback" not in proc.stderr


def test_help_and_version():
    help_text = _run("--help")
    assert help_text.returncode == 0 and "MEMORY_BUDGET_BYTES" in help_text.stdout
    version = _run("--version")
    assert version.returncode == 0 and __version__ in version.stdout
