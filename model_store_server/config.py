"""The store's typed configuration, from environment and command line."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from model_store_server.models_config import ModelsConfig, load_models_config
from model_store_server.session_history import SessionBounds
from model_store_server.workers_config import (WorkerSpec, check_workers, load_workers_config, name_for_url,
                                                workers_from_urls)
from model_swap.cli import add_setting, add_switch, settings_parser
from model_swap.config import LOOPBACK_HOSTS, ConfigError, parse_number, parse_optional_number
from model_swap.errors import ApiError
from model_swap.names import check_model_name

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
    api_key: str | None = None
    allow_insecure: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int = 32
    worker_timeout_s: float = 600.0
    request_timeout_s: float = 30.0
    reconcile_on_start: bool = True
    log_level: str = "INFO"
    # The memory tier and the request gates (see docs/architecture.md).
    keep_alive_seconds: float = 300.0  # idle time before a model is unloaded; < 0 never, 0 at once
    max_swap_wait_ms: int = 2000  # how long requests for a swap's victims may overtake it
    pinned_models: tuple[str, ...] = ()
    preload_models: tuple[str, ...] = ()
    max_queue: int = 64  # requests waiting per model before 429 queue_full
    queue_timeout_s: float = 300.0  # longest wait before 503 queue_timeout
    switch_settle_s: float = 0.5  # /admin/switch: wait after unloading for memory to be returned
    models_config: ModelsConfig = ModelsConfig()
    # Chat sessions (docs/architecture.md, "Sessions"); None keeps them in memory only (tests).
    sessions_db: Path | None = None
    session_bounds: SessionBounds = SessionBounds()
    session_ttl_s: float = 7 * 86400.0
    # Several workers (WORKER_URLS or WORKERS_CONFIG); empty: the one worker at worker_url.
    workers: tuple[WorkerSpec, ...] = ()
    max_replicas: int = 2  # copies of one model resident at once, across workers
    probe_max_s: float = 10.0  # longest wait between probes of a worker that stopped answering

    def worker_specs(self) -> tuple[WorkerSpec, ...]:
        """Every worker with its settings filled in from the store's where it does not say."""
        specs = self.workers or (WorkerSpec(name_for_url(self.worker_url), self.worker_url),)
        return tuple(WorkerSpec(
            s.name, s.url, s.max_cache_size if s.max_cache_size is not None else self.max_cache_size,
            s.max_cache_bytes if s.max_cache_bytes is not None else self.max_cache_bytes,
            s.rdma_host if s.rdma_host is not None else self.worker_rdma_host,
            s.rdma_port if s.rdma_port is not None else self.worker_rdma_port) for s in specs)

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
        check_workers(self.workers)
        if self.max_replicas < 1:
            raise ConfigError(f"MAX_REPLICAS must be at least 1, got {self.max_replicas}")
        if self.probe_max_s <= 0:
            raise ConfigError(f"PROBE_MAX_S must be positive, got {self.probe_max_s}")
        if self.max_swap_wait_ms < 0:
            raise ConfigError(f"MAX_SWAP_WAIT_MS must not be negative, got {self.max_swap_wait_ms}")
        if self.max_queue < 1:
            raise ConfigError(f"MAX_QUEUE must be at least 1, got {self.max_queue}")
        if self.queue_timeout_s <= 0:
            raise ConfigError(f"QUEUE_TIMEOUT_S must be positive, got {self.queue_timeout_s}")
        for label, names in (("PINNED_MODELS", self.pinned_models), ("PRELOAD_MODELS", self.preload_models)):
            for name in names:
                try:
                    check_model_name(name)
                except ApiError as err:
                    raise ConfigError(f"{label}: {err.message}") from None
        for spec in self.worker_specs():
            if len(self.pinned_models) >= spec.max_cache_size and self.cache_policy != "ttl":
                raise ConfigError(f"PINNED_MODELS ({len(self.pinned_models)}) must leave room in MAX_CACHE_SIZE="
                                  f"{spec.max_cache_size} (worker {spec.name}) for other models")
        if self.session_ttl_s <= 0:
            raise ConfigError(f"SESSION_TTL_S must be positive, got {self.session_ttl_s}")
        if self.switch_settle_s < 0:
            raise ConfigError(f"SWITCH_SETTLE_S must not be negative, got {self.switch_settle_s}")
        if self.request_timeout_s <= 0:
            raise ConfigError(f"REQUEST_TIMEOUT_S must be positive, got {self.request_timeout_s}")
        if self.host not in LOOPBACK_HOSTS and not self.api_key and not self.allow_insecure:
            raise ConfigError(
                f"refusing to bind {self.host} without STORE_API_KEY: anyone could use and reset the store; "
                "set a key or pass --insecure-no-token"
            )


def store_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The store's command line; each flag falls back to its environment variable, then its default."""
    d = StoreConfig
    p = settings_parser("model-store-server", "model-swap model store server: owns the GGUF files, decides "
                        "which live on the inference worker, and forwards requests to it")
    add_setting(p, env, "--models-dir", "MODELS_DIR", d.models_dir, "directory of the .gguf files to serve")
    add_setting(p, env, "--worker-url", "WORKER_URL", d.worker_url, "base URL of the inference worker")
    add_setting(p, env, "--worker-urls", "WORKER_URLS", None,
                "comma-separated base URLs of several inference workers (instead of WORKER_URL)")
    add_setting(p, env, "--workers-config", "WORKERS_CONFIG", None,
                "TOML file with [workers.NAME] tables: url and the settings where a worker differs")
    add_setting(p, env, "--max-replicas", "MAX_REPLICAS", d.max_replicas,
                "most workers one model may be resident on at once")
    add_setting(p, env, "--probe-max-s", "PROBE_MAX_S", d.probe_max_s,
                "longest wait between probes of a worker that stopped answering (the backoff starts at 0.25 s)")
    add_setting(p, env, "--cache-policy", "CACHE_POLICY", d.cache_policy,
                f"which models stay on the worker: {', '.join(POLICIES)}")
    add_setting(p, env, "--max-cache-size", "MAX_CACHE_SIZE", d.max_cache_size,
                "most models in the worker's disk cache (lru, no-evict, lru-ttl)")
    add_setting(p, env, "--max-cache-bytes", "MAX_CACHE_BYTES", d.max_cache_bytes,
                "optional bound in bytes on the worker's disk cache")
    add_setting(p, env, "--ttl-seconds", "TTL_SECONDS", d.ttl_seconds,
                "seconds an untouched model stays cached (ttl, lru-ttl)")
    add_setting(p, env, "--transport", "TRANSPORT", d.transport, "how model bytes reach the worker: http or rdma")
    add_setting(p, env, "--allow-fallback", "ALLOW_FALLBACK", "0",
                "1: retry a failed rdma send over http", choices=["0", "1"])
    add_setting(p, env, "--worker-rdma-host", "WORKER_RDMA_HOST", d.worker_rdma_host,
                "host of the worker's RDMA listener")
    add_setting(p, env, "--worker-rdma-port", "WORKER_RDMA_PORT", d.worker_rdma_port,
                "port of the worker's RDMA listener")
    add_setting(p, env, "--worker-token", "WORKER_TOKEN", d.worker_token,
                "bearer token the store sends to the worker", secret=True)
    add_setting(p, env, "--api-key", "STORE_API_KEY", d.api_key,
                "bearer token clients must send on every endpoint but /health", secret=True)
    add_switch(p, env, "--insecure-no-token", "STORE_INSECURE_NO_TOKEN",
               "allow a non-loopback bind without STORE_API_KEY")
    add_setting(p, env, "--host", "STORE_HOST", d.host, "address to listen on")
    add_setting(p, env, "--port", "STORE_PORT", d.port, "port to listen on")
    add_setting(p, env, "--threads", "STORE_THREADS", d.threads, "request threads")
    add_setting(p, env, "--request-timeout-s", "REQUEST_TIMEOUT_S", d.request_timeout_s,
                "seconds a client may take to send its request, or stall reading a response, before it is cut off")
    add_setting(p, env, "--models-config", "MODELS_CONFIG", None,
                "TOML file with model aliases and per-model settings")
    add_setting(p, env, "--log-level", "LOG_LEVEL", d.log_level, "DEBUG, INFO, WARNING or ERROR")
    add_setting(p, env, "--keep-alive-seconds", "KEEP_ALIVE_SECONDS", d.keep_alive_seconds,
                "seconds an idle model stays in the worker's memory; negative: never unloaded, 0: at once")
    add_setting(p, env, "--max-swap-wait-ms", "MAX_SWAP_WAIT_MS", d.max_swap_wait_ms,
                "how long requests for a swap's victims may still start on them before the swap goes first")
    add_setting(p, env, "--pinned-models", "PINNED_MODELS", None,
                "comma-separated models loaded at start and never unloaded or evicted")
    add_setting(p, env, "--preload-models", "PRELOAD_MODELS", None, "comma-separated models loaded at start")
    add_setting(p, env, "--max-queue", "MAX_QUEUE", d.max_queue,
                "requests that may wait for one model before 429 queue_full")
    add_setting(p, env, "--queue-timeout-s", "QUEUE_TIMEOUT_S", d.queue_timeout_s,
                "longest wait for a model before 503 queue_timeout")
    add_setting(p, env, "--sessions-db", "SESSIONS_DB", None,
                "SQLite file of the chat sessions (default: $RUN_DIR/sessions.db, RUN_DIR defaulting to ./run)")
    b = SessionBounds
    add_setting(p, env, "--session-max-messages", "SESSION_MAX_MESSAGES", b.max_messages,
                "most messages a session request sends (the system prompt and the request's own included)")
    add_setting(p, env, "--session-max-chars", "SESSION_MAX_CHARS", b.max_chars,
                "most characters of messages a session request sends")
    add_setting(p, env, "--session-max-prompt-tokens", "SESSION_MAX_PROMPT_TOKENS", b.max_prompt_tokens,
                "most prompt tokens a session request sends (default: what fits the model's context)")
    add_setting(p, env, "--session-ttl-s", "SESSION_TTL_S", d.session_ttl_s,
                "seconds an idle session is kept")
    add_setting(p, env, "--switch-settle-s", "SWITCH_SETTLE_S", d.switch_settle_s,
                "seconds /admin/switch waits after unloading, for memory to be returned, before it loads")
    return p


def load_store_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> StoreConfig:
    """Build the config: CLI flags win over environment variables, which win over defaults."""
    env = os.environ if env is None else env
    a = store_parser(env).parse_args(argv)
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
        worker_token=a.worker_token or None,
        api_key=a.api_key or None,
        allow_insecure=a.insecure_no_token,
        host=a.host,
        port=parse_number(a.port, "port"),
        threads=parse_number(a.threads, "threads"),
        request_timeout_s=parse_number(a.request_timeout_s, "REQUEST_TIMEOUT_S", float),
        log_level=a.log_level,
        keep_alive_seconds=parse_number(a.keep_alive_seconds, "KEEP_ALIVE_SECONDS", float),
        max_swap_wait_ms=parse_number(a.max_swap_wait_ms, "MAX_SWAP_WAIT_MS"),
        pinned_models=_name_list(a.pinned_models),
        preload_models=_name_list(a.preload_models),
        max_queue=parse_number(a.max_queue, "MAX_QUEUE"),
        queue_timeout_s=parse_number(a.queue_timeout_s, "QUEUE_TIMEOUT_S", float),
        switch_settle_s=parse_number(a.switch_settle_s, "SWITCH_SETTLE_S", float),
        models_config=load_models_config(a.models_config),
        sessions_db=Path(a.sessions_db) if a.sessions_db else Path(env.get("RUN_DIR") or "./run") / "sessions.db",
        session_bounds=SessionBounds(parse_number(a.session_max_messages, "SESSION_MAX_MESSAGES"),
                                     parse_number(a.session_max_chars, "SESSION_MAX_CHARS"),
                                     parse_optional_number(a.session_max_prompt_tokens, "SESSION_MAX_PROMPT_TOKENS")),
        session_ttl_s=parse_number(a.session_ttl_s, "SESSION_TTL_S", float),
        workers=_workers(a.worker_urls, a.workers_config),
        max_replicas=parse_number(a.max_replicas, "MAX_REPLICAS"),
        probe_max_s=parse_number(a.probe_max_s, "PROBE_MAX_S", float),
    )


def _workers(urls: str | None, path: str | None) -> tuple[WorkerSpec, ...]:
    """The workers WORKER_URLS or WORKERS_CONFIG name (not both); none: WORKER_URL's one worker."""
    if urls and path:
        raise ConfigError("set WORKER_URLS or WORKERS_CONFIG, not both (the file can hold the URLs)")
    if path:
        return load_workers_config(path)
    return workers_from_urls(urls) if urls else ()


def _name_list(value: str | None) -> tuple[str, ...]:
    """A comma-separated list of model names, without blanks or repeats, in order."""
    return tuple(dict.fromkeys(part.strip() for part in (value or "").split(",") if part.strip()))
