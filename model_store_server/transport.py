"""How model bytes reach the worker's cache: one small interface, HTTP and RDMA behind it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from model_store_server.catalog import StoredModel
from model_store_server.worker_client import WorkerClient
from model_swap.errors import ApiError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sent:
    """What a transfer did: which transport carried it, and how long it took."""

    transport: str
    seconds: float


Progress = Optional[Callable[[int], None]]  # called with the bytes sent so far


class Transport(Protocol):
    """Puts one model's bytes into the worker's cache, verified, or raises ApiError."""

    name: str

    def send(self, model: StoredModel, progress: Progress = None) -> Sent: ...


class HttpTransport:
    """Pushes the file to the worker's /cache_model in large blocks."""

    name = "http"

    def __init__(self, worker: WorkerClient):
        self._worker = worker

    def send(self, model: StoredModel, progress: Progress = None) -> Sent:
        return Sent(self.name, self._worker.push(model.name, model.path, model.size, model.sha256, progress))


class FallbackTransport:
    """Tries the primary transport; if it fails, says so in the log and sends over the fallback."""

    def __init__(self, primary: Transport, fallback: Transport):
        self._primary = primary
        self._fallback = fallback
        self.name = primary.name

    def send(self, model: StoredModel, progress: Progress = None) -> Sent:
        try:
            return self._primary.send(model, progress)
        except ApiError as err:
            log.warning("[transport] %s send of %s failed (%s: %s); falling back to %s",
                        self._primary.name, model.name, err.code, err.message, self._fallback.name)
            started = time.perf_counter()
            self._fallback.send(model, progress)
            return Sent(f"{self._fallback.name}(fallback)", time.perf_counter() - started)


def build_transport(config, worker: WorkerClient, rdma_host: str | None = None,
                    rdma_port: int | None = None) -> Transport:
    """The transport the config asks for to one worker (its own RDMA address), with the HTTP fallback when allowed."""
    http = HttpTransport(worker)
    if config.transport == "http":
        return http
    from model_store_server.rdma_transport import RdmaTransport

    rdma = RdmaTransport(rdma_host or config.worker_rdma_host, rdma_port or config.worker_rdma_port,
                         token=config.worker_token)
    return FallbackTransport(rdma, http) if config.allow_fallback else rdma
