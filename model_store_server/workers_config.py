"""The store's workers: `WORKER_URLS` (a comma list) or a TOML workers file (`WORKERS_CONFIG`).

```toml
[workers.gpu1]                     # "gpu1" names the worker in views, headers and logs
url = "http://gpu1:8080"
max_cache_size = 4                 # settings where this worker differs from the store's defaults
max_cache_bytes = 40_000_000_000
rdma_host = "10.0.0.1"
rdma_port = 8081

[workers.gpu2]
url = "http://gpu2:8080"
```

Without either, the store drives the one worker at `WORKER_URL` with the store-wide settings.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from model_swap.config import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 takes the same parser from its backport
    import tomli as tomllib

# A worker's name appears in headers, log lines and metric labels: keep it plain.
WORKER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,99}")
WORKER_KEYS = frozenset({"url", "max_cache_size", "max_cache_bytes", "rdma_host", "rdma_port"})


@dataclass(frozen=True)
class WorkerSpec:
    """One worker: its name and URL, and the settings where it differs from the store's (None: the store's)."""

    name: str
    url: str
    max_cache_size: int | None = None
    max_cache_bytes: int | None = None
    rdma_host: str | None = None
    rdma_port: int | None = None

    def __post_init__(self) -> None:
        if not WORKER_NAME_RE.fullmatch(self.name):
            raise ConfigError(f"worker name {self.name!r} must be letters, digits, '.', '_', '-' or ':'")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"worker {self.name}: url must start with http:// or https://, got {self.url!r}")
        if self.max_cache_size is not None and self.max_cache_size < 1:
            raise ConfigError(f"worker {self.name}: max_cache_size must be at least 1, got {self.max_cache_size}")
        if self.max_cache_bytes is not None and self.max_cache_bytes < 1:
            raise ConfigError(f"worker {self.name}: max_cache_bytes must be positive, got {self.max_cache_bytes}")
        if self.rdma_port is not None and not 0 < self.rdma_port < 65536:
            raise ConfigError(f"worker {self.name}: rdma_port must be 1-65535, got {self.rdma_port}")


def check_workers(workers: tuple[WorkerSpec, ...]) -> None:
    """Names and URLs are unique."""
    for label, values in (("name", [w.name for w in workers]), ("url", [w.url for w in workers])):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ConfigError(f"workers: each {label} may appear once, repeated: {', '.join(repeated)}")


def name_for_url(url: str) -> str:
    """A worker's default name: its host and port (`gpu1:8080`)."""
    return url.split("://", 1)[1].split("/", 1)[0]


def workers_from_urls(value: str) -> tuple[WorkerSpec, ...]:
    """WORKER_URLS: a comma list of base URLs, each worker named by its host:port."""
    urls = [part.strip().rstrip("/") for part in value.split(",") if part.strip()]
    if not urls:
        raise ConfigError("WORKER_URLS is set but lists no URL")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"WORKER_URLS: each URL must start with http:// or https://, got {url!r}")
    return tuple(WorkerSpec(name_for_url(url), url) for url in urls)


def load_workers_config(path: str | Path) -> tuple[WorkerSpec, ...]:
    """Read and check a workers file; every problem is a ConfigError naming the file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"WORKERS_CONFIG {path}: cannot read it ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"WORKERS_CONFIG {path}: not valid TOML ({err})") from None
    unknown = sorted(set(data) - {"workers"})
    if unknown:
        raise ConfigError(f"WORKERS_CONFIG {path}: unknown top-level keys {unknown}; expected [workers.NAME] tables")
    tables = data.get("workers")
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"WORKERS_CONFIG {path}: no [workers.NAME] tables")
    specs = []
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"WORKERS_CONFIG {path}: workers.{name} must be a table")
        extra = sorted(set(table) - WORKER_KEYS)
        if extra:
            raise ConfigError(f"WORKERS_CONFIG {path}: workers.{name} has unknown keys {extra}; "
                              f"known: {', '.join(sorted(WORKER_KEYS))}")
        if not isinstance(table.get("url"), str):
            raise ConfigError(f"WORKERS_CONFIG {path}: workers.{name} needs url = \"http://host:port\"")
        for key in ("max_cache_size", "max_cache_bytes", "rdma_port"):
            if key in table and (not isinstance(table[key], int) or isinstance(table[key], bool)):
                raise ConfigError(f"WORKERS_CONFIG {path}: workers.{name}.{key} must be an integer")
        if "rdma_host" in table and not isinstance(table["rdma_host"], str):
            raise ConfigError(f"WORKERS_CONFIG {path}: workers.{name}.rdma_host must be a string")
        try:
            specs.append(WorkerSpec(name, table["url"].rstrip("/"), table.get("max_cache_size"),
                                    table.get("max_cache_bytes"), table.get("rdma_host"), table.get("rdma_port")))
        except ConfigError as err:
            raise ConfigError(f"WORKERS_CONFIG {path}: {err}") from None
    specs = tuple(specs)
    try:
        check_workers(specs)
    except ConfigError as err:
        raise ConfigError(f"WORKERS_CONFIG {path}: {err}") from None
    return specs
