"""The store's typed configuration, from environment and command line."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from model_store_server.models_config import ModelsConfig, load_models_config
from model_swap.config import ConfigError, parse_number, parse_optional_number

POLICIES = ("lru", "no-evict", "ttl", "lru-ttl")
TRANSPORTS = ("http", "rdma")


@dataclass(frozen=True)
class StoreConfig:
    """Everything the store needs to start; validated on construction."""

    models_dir: Path = Path("./models")
    worker_url: str = "http://localhost:8080"
    max_cache_size: int = 2
    max_cache_bytes: int | None = None
    ttl_seconds: float | None = 5.0
    cache_policy: str = "lru"
    transport: str = "http"
    allow_fallback: bool = False
    worker_rdma_host: str = "localhost"
    worker_rdma_port: int = 8081
    worker_token: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int = 32
    worker_timeout_s: float = 600.0
    reconcile_on_start: bool = True
    log_level: str = "INFO"
    models_config: ModelsConfig = ModelsConfig()

    def __post_init__(self) -> None:
        if self.cache_policy not in POLICIES:
            raise ConfigError(f"CACHE_POLICY must be one of {', '.join(POLICIES)}, got {self.cache_policy!r}")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"TRANSPORT must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        if self.max_cache_size < 1:
            raise ConfigError(f"MAX_CACHE_SIZE must be at least 1, got {self.max_cache_size}")
        if self.max_cache_bytes is not None and self.max_cache_bytes < 1:
            raise ConfigError(f"MAX_CACHE_BYTES must be positive, got {self.max_cache_bytes}")
        if self.cache_policy in ("ttl", "lru-ttl") and (self.ttl_seconds is None or self.ttl_seconds <= 0):
            raise ConfigError(f"CACHE_POLICY={self.cache_policy} needs a positive TTL_SECONDS")
        for label, port in (("port", self.port), ("WORKER_RDMA_PORT", self.worker_rdma_port)):
            if not 0 < port < 65536:
                raise ConfigError(f"{label} must be 1-65535, got {port}")
        if not self.worker_url.startswith(("http://", "https://")):
            raise ConfigError(f"WORKER_URL must start with http:// or https://, got {self.worker_url!r}")
        if self.threads < 1:
            raise ConfigError("threads must be at least 1")


def load_store_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> StoreConfig:
    """Build the config: CLI flags win over environment variables, which win over defaults."""
    env = os.environ if env is None else env
    d = StoreConfig
    p = argparse.ArgumentParser(prog="model-store-server", description="model-swap model store server")
    p.add_argument("--models-dir", default=env.get("MODELS_DIR", str(d.models_dir)))
    p.add_argument("--worker-url", default=env.get("WORKER_URL", d.worker_url))
    p.add_argument("--max-cache-size", default=env.get("MAX_CACHE_SIZE", str(d.max_cache_size)))
    p.add_argument("--max-cache-bytes", default=env.get("MAX_CACHE_BYTES"))
    p.add_argument("--ttl-seconds", default=env.get("TTL_SECONDS", str(d.ttl_seconds)))
    p.add_argument("--cache-policy", default=env.get("CACHE_POLICY", d.cache_policy), help=", ".join(POLICIES))
    p.add_argument("--transport", default=env.get("TRANSPORT", d.transport), help="http or rdma")
    p.add_argument("--allow-fallback", default=env.get("ALLOW_FALLBACK", "0"), choices=["0", "1"])
    p.add_argument("--worker-rdma-host", default=env.get("WORKER_RDMA_HOST", d.worker_rdma_host))
    p.add_argument("--worker-rdma-port", default=env.get("WORKER_RDMA_PORT", str(d.worker_rdma_port)))
    p.add_argument("--worker-token", default=env.get("WORKER_TOKEN") or None)
    p.add_argument("--host", default=env.get("STORE_HOST", d.host))
    p.add_argument("--port", default=env.get("STORE_PORT", str(d.port)))
    p.add_argument("--threads", default=env.get("STORE_THREADS", str(d.threads)))
    p.add_argument("--log-level", default=env.get("LOG_LEVEL", d.log_level))
    p.add_argument("--models-config", default=env.get("MODELS_CONFIG"),
                   help="TOML file with model aliases and per-model settings (env MODELS_CONFIG; default: none)")
    a = p.parse_args(argv)
    return StoreConfig(
        models_dir=Path(a.models_dir),
        worker_url=a.worker_url.rstrip("/"),
        max_cache_size=parse_number(a.max_cache_size, "MAX_CACHE_SIZE"),
        max_cache_bytes=parse_optional_number(a.max_cache_bytes, "MAX_CACHE_BYTES"),
        ttl_seconds=parse_optional_number(a.ttl_seconds, "TTL_SECONDS", float),
        cache_policy=a.cache_policy,
        transport=a.transport,
        allow_fallback=a.allow_fallback == "1",
        worker_rdma_host=a.worker_rdma_host,
        worker_rdma_port=parse_number(a.worker_rdma_port, "WORKER_RDMA_PORT"),
        worker_token=a.worker_token,
        host=a.host,
        port=parse_number(a.port, "port"),
        threads=parse_number(a.threads, "threads"),
        log_level=a.log_level,
        models_config=load_models_config(a.models_config),
    )
