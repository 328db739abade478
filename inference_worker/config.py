"""The worker's typed configuration, from environment and command line."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from model_swap.config import ConfigError, parse_number, parse_optional_number

GIB = 1 << 30
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


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


def load_worker_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> WorkerConfig:
    """Build the config: CLI flags win over environment variables, which win over defaults."""
    env = os.environ if env is None else env
    d = WorkerConfig
    parser = argparse.ArgumentParser(prog="inference-worker", description="model-swap inference worker")
    parser.add_argument("--cache-dir", default=env.get("MODEL_CACHE_DIR", str(d.cache_dir)))
    parser.add_argument("--host", default=env.get("WORKER_HOST", d.host))
    parser.add_argument("--port", default=env.get("WORKER_PORT", str(d.port)))
    parser.add_argument("--token", default=env.get("WORKER_TOKEN") or None)
    parser.add_argument("--insecure-no-token", action="store_true",
                        default=env.get("WORKER_INSECURE_NO_TOKEN") == "1",
                        help="allow binding a non-loopback address without a token")
    parser.add_argument("--n-gpu-layers", default=env.get("N_GPU_LAYERS", str(d.n_gpu_layers)))
    parser.add_argument("--n-ctx", default=env.get("N_CTX", str(d.n_ctx)))
    parser.add_argument("--max-model-bytes", default=env.get("MAX_MODEL_BYTES", str(d.max_model_bytes)))
    parser.add_argument("--reserve-disk-bytes", default=env.get("RESERVE_DISK_BYTES", str(d.reserve_disk_bytes)))
    parser.add_argument("--rdma-port", default=env.get("WORKER_RDMA_PORT"),
                        help="start the RDMA listener on this port (needs pyverbs and a device)")
    parser.add_argument("--threads", default=env.get("WORKER_THREADS", str(d.threads)))
    parser.add_argument("--request-timeout-s", default=env.get("REQUEST_TIMEOUT_S", str(d.request_timeout_s)),
                        help="seconds a client may take to send its request, or stall reading a response")
    parser.add_argument("--log-level", default=env.get("LOG_LEVEL", d.log_level))
    args = parser.parse_args(argv)
    return WorkerConfig(
        cache_dir=Path(args.cache_dir),
        host=args.host,
        port=parse_number(args.port, "port"),
        token=args.token,
        allow_insecure=args.insecure_no_token,
        n_gpu_layers=parse_number(args.n_gpu_layers, "N_GPU_LAYERS"),
        n_ctx=parse_number(args.n_ctx, "N_CTX"),
        max_model_bytes=parse_number(args.max_model_bytes, "MAX_MODEL_BYTES"),
        reserve_disk_bytes=parse_number(args.reserve_disk_bytes, "RESERVE_DISK_BYTES"),
        rdma_port=parse_optional_number(args.rdma_port, "WORKER_RDMA_PORT"),
        threads=parse_number(args.threads, "threads"),
        request_timeout_s=parse_number(args.request_timeout_s, "REQUEST_TIMEOUT_S", float),
        log_level=args.log_level,
    )
