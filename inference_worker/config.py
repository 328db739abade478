"""The worker's typed configuration, from environment and command line."""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from model_swap.cli import add_setting, add_switch, settings_parser
from model_swap.config import ConfigError, parse_number, parse_optional_number

GIB = 1 << 30
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
AUTO = "auto"
MAX_PARALLEL = 64  # far beyond what a CPU gains from (8 slots already saturate two cores); llama.cpp allows 256


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask, which cgroups and taskset narrow)."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class WorkerConfig:
    """Everything the worker needs to start; validated on construction."""

    cache_dir: Path = Path("./model_cache")
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    allow_insecure: bool = False
    n_gpu_layers: int = -1
    n_ctx: int = 2048
    n_parallel: int = 4  # streams decoded together per model; 1 keeps the single-stream engine
    batch_invariant: bool = False
    flash_attn: bool = False
    n_threads: int = field(default_factory=usable_cores)
    n_threads_batch: int = field(default_factory=usable_cores)
    memory_budget_bytes: int | None = None  # None: chosen at start (memory.detect_budget)
    max_loaded_models: int = 3
    unload_drain_timeout_s: float = 30.0
    max_model_bytes: int = 64 * GIB
    reserve_disk_bytes: int = 256 << 20
    rdma_port: int | None = None
    threads: int = 16
    request_timeout_s: float = 30.0
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be 1-65535, got {self.port}")
        if self.rdma_port is not None and not 0 < self.rdma_port < 65536:
            raise ConfigError(f"rdma port must be 1-65535, got {self.rdma_port}")
        if self.n_ctx < 16:
            raise ConfigError(f"n_ctx must be at least 16, got {self.n_ctx}")
        if not 1 <= self.n_parallel <= MAX_PARALLEL:
            raise ConfigError(f"N_PARALLEL must be 1-{MAX_PARALLEL}, got {self.n_parallel}")
        if self.n_threads < 1 or self.n_threads_batch < 1:
            raise ConfigError("N_THREADS and N_THREADS_BATCH must be at least 1")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            raise ConfigError("MEMORY_BUDGET_BYTES must be positive (or auto)")
        if self.max_loaded_models < 1:
            raise ConfigError("MAX_LOADED_MODELS must be at least 1")
        if self.unload_drain_timeout_s < 0:
            raise ConfigError("UNLOAD_DRAIN_TIMEOUT_S must not be negative")
        if self.max_model_bytes <= 0:
            raise ConfigError("max model bytes must be positive")
        if self.reserve_disk_bytes < 0:
            raise ConfigError("reserved disk bytes must not be negative")
        if self.threads < 1:
            raise ConfigError("threads must be at least 1")
        if self.request_timeout_s <= 0:
            raise ConfigError(f"REQUEST_TIMEOUT_S must be positive, got {self.request_timeout_s}")
        if self.host not in LOOPBACK_HOSTS and not self.token and not self.allow_insecure:
            raise ConfigError(
                f"refusing to bind {self.host} without WORKER_TOKEN: anyone could write models; "
                "set a token or pass --insecure-no-token"
            )


def check_cache_dir(path: Path) -> None:
    """Create the cache directory if needed and prove it writable, or raise ConfigError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cache directory {path} cannot be created: {err.strerror or err}") from None
    if not path.is_dir():
        raise ConfigError(f"cache directory {path} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(f"cache directory {path} is not writable: {err.strerror or err}") from None


def _build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """Every flag says what it does, its default and its environment variable."""
    d = WorkerConfig
    parser = settings_parser("inference-worker", "model-swap inference worker: a disk cache of GGUF files and the "
                             "llama.cpp models resident in memory.")

    def flag(name: str, var: str, default, text: str, **kwargs) -> None:
        add_setting(parser, env, name, var, default, text, **kwargs)

    cores = usable_cores()
    flag("--cache-dir", "MODEL_CACHE_DIR", d.cache_dir, "directory of the disk cache; created if missing")
    flag("--host", "WORKER_HOST", d.host, "address to listen on; a non-loopback one needs a token")
    flag("--port", "WORKER_PORT", d.port, "HTTP port")
    add_setting(parser, env, "--token", "WORKER_TOKEN", None,
                "require 'Authorization: Bearer TOKEN' on every endpoint but /health", secret=True)
    add_switch(parser, env, "--insecure-no-token", "WORKER_INSECURE_NO_TOKEN",
               "allow a non-loopback bind without a token")
    flag("--n-gpu-layers", "N_GPU_LAYERS", d.n_gpu_layers, "layers to offload to a GPU (-1: all; a CPU build ignores it)")
    flag("--n-ctx", "N_CTX", d.n_ctx, "context length in tokens of every loaded model")
    flag("--n-parallel", "N_PARALLEL", d.n_parallel,
         "streams of one model decoded together in one batch, each with its own N_CTX of KV cache; "
         "1: one generation per model at a time, on the single-stream engine")
    add_switch(parser, env, "--batch-invariant", "BATCH_INVARIANT",
               "load weights without llama.cpp's CPU repacking, so a greedy stream's text is the same whatever "
               "N_PARALLEL and whatever shares its batch (slower for models whose weights get repacked)")
    add_switch(parser, env, "--flash-attn", "FLASH_ATTN",
               "llama.cpp's flash attention in both engines: faster for several streams, other rounding than "
               "without (BATCH_INVARIANT turns it off)")
    flag("--n-threads", "N_THREADS", cores,
         "llama.cpp threads per generation; the default is every core this process may use")
    flag("--n-threads-batch", "N_THREADS_BATCH", cores,
         "llama.cpp threads for prompt processing; the default is every core this process may use")
    flag("--memory-budget-bytes", "MEMORY_BUDGET_BYTES", AUTO,
         "bytes the resident models may take; auto: 80%% of the memory available at start (MemAvailable or the "
         "cgroup's room, the lower), or a GPU's free memory less 10%% with a GPU build and nvidia-ml-py")
    flag("--max-loaded-models", "MAX_LOADED_MODELS", d.max_loaded_models, "most models resident at once")
    flag("--unload-drain-timeout-s", "UNLOAD_DRAIN_TIMEOUT_S", d.unload_drain_timeout_s,
         "seconds an unload waits for a model's generations before answering 409 model_busy")
    flag("--max-model-bytes", "MAX_MODEL_BYTES", d.max_model_bytes, "largest model body accepted (413 above)")
    flag("--reserve-disk-bytes", "RESERVE_DISK_BYTES", d.reserve_disk_bytes,
         "free disk kept; a body that would eat into it gets 507")
    flag("--rdma-port", "WORKER_RDMA_PORT", None, "start the RDMA listener on this port (needs pyverbs and a device)")
    flag("--threads", "WORKER_THREADS", d.threads, "HTTP request threads")
    flag("--request-timeout-s", "REQUEST_TIMEOUT_S", d.request_timeout_s,
         "seconds a client may take to send its request, or stall reading a response")
    flag("--log-level", "LOG_LEVEL", d.log_level, "DEBUG, INFO, WARNING or ERROR")
    return parser


def load_worker_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> WorkerConfig:
    """Build the config: CLI flags win over environment variables, which win over defaults."""
    env = os.environ if env is None else env
    args = _build_parser(env).parse_args(argv)
    budget = None if str(args.memory_budget_bytes).strip().lower() == AUTO else \
        parse_number(args.memory_budget_bytes, "MEMORY_BUDGET_BYTES")
    return WorkerConfig(
        cache_dir=Path(args.cache_dir),
        host=args.host,
        port=parse_number(args.port, "port"),
        token=args.token or None,
        allow_insecure=args.insecure_no_token,
        n_gpu_layers=parse_number(args.n_gpu_layers, "N_GPU_LAYERS"),
        n_ctx=parse_number(args.n_ctx, "N_CTX"),
        n_parallel=parse_number(args.n_parallel, "N_PARALLEL"),
        batch_invariant=args.batch_invariant,
        flash_attn=args.flash_attn,
        n_threads=parse_number(args.n_threads, "N_THREADS"),
        n_threads_batch=parse_number(args.n_threads_batch, "N_THREADS_BATCH"),
        memory_budget_bytes=budget,
        max_loaded_models=parse_number(args.max_loaded_models, "MAX_LOADED_MODELS"),
        unload_drain_timeout_s=parse_number(args.unload_drain_timeout_s, "UNLOAD_DRAIN_TIMEOUT_S", float),
        max_model_bytes=parse_number(args.max_model_bytes, "MAX_MODEL_BYTES"),
        reserve_disk_bytes=parse_number(args.reserve_disk_bytes, "RESERVE_DISK_BYTES"),
        rdma_port=parse_optional_number(args.rdma_port, "WORKER_RDMA_PORT"),
        threads=parse_number(args.threads, "threads"),
        request_timeout_s=parse_number(args.request_timeout_s, "REQUEST_TIMEOUT_S", float),
        log_level=args.log_level,
    )
