"""HTTP calls from the store to the worker, each error mapped to one envelope code."""

from __future__ import annotations

import http.client
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator
from urllib.parse import quote, urlsplit

import requests

from model_swap.digest import BLOCK_SIZE
from model_swap.errors import ApiError
from model_swap.model_settings import ModelSettings
from model_swap.names import check_model_name
from model_swap.web import GenerationRequest

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 5.0
USER_INPUT_CODES = frozenset({"invalid_request", "prompt_too_long"})


class WorkerUnavailable(ApiError):
    """The worker could not be reached."""

    def __init__(self, message: str):
        super().__init__(502, "worker_unavailable", message)


def _error_from(status: int, body: bytes) -> ApiError:
    """Carry the worker's error code through, answered as 502 by the store."""
    try:
        error = json.loads(body)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "worker_error", body[:200].decode("utf-8", "replace")
    if code == "internal_error":
        code = "worker_error"
    if status == 400 and code in USER_INPUT_CODES:
        return ApiError(400, code, message)  # the user's request was at fault, not the worker
    return ApiError(502, code, f"worker answered {status}: {message}")


@dataclass(frozen=True)
class WorkerState:
    """What the worker says is on its disk and in memory."""

    loaded: tuple[str, ...]  # the resident models' names, in load order
    cached: list[dict]
    boot_id: str | None  # changes when the worker process restarts
    resident: tuple[dict, ...] = ()  # the worker's entry for each of them (n_ctx, memory_bytes, ...)


class WorkerClient:
    """Talks to one worker; thread-safe (requests.Session pools connections)."""

    def __init__(self, base_url: str, token: str | None, timeout_s: float,
                 settings_for: Callable[[str], ModelSettings] = lambda name: ModelSettings()):
        self.base_url = base_url.rstrip("/")
        self._settings_for = settings_for  # per-model load settings (the models config), sent with every load
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session = requests.Session()
        self._session.headers.update(self._headers)

    def _call(self, method: str, path: str, **kwargs) -> requests.Response:
        try:
            response = self._session.request(method, self.base_url + path,
                                             timeout=(CONNECT_TIMEOUT_S, self.timeout_s), **kwargs)
        except requests.RequestException as err:
            raise WorkerUnavailable(f"worker at {self.base_url} unreachable: {err.__class__.__name__}") from err
        if response.status_code >= 400 and not kwargs.get("stream"):
            raise _error_from(response.status_code, response.content)
        return response

    def state(self) -> WorkerState:
        body = self._call("GET", "/models").json()
        entries = tuple(e for e in body.get("loaded") or [] if isinstance(e, dict) and isinstance(e.get("name"), str))
        return WorkerState(tuple(e["name"] for e in entries), list(body.get("cached", [])), body.get("boot_id"),
                           entries)

    def boot_id(self) -> str | None:
        """The worker process's boot id, from its (cheap, unauthenticated) /health."""
        return self._call("GET", "/health").json().get("boot_id")

    def status(self) -> tuple[str, WorkerState | None]:
        """"ok", "unauthorized", "unreachable" or "error", through an authenticated call (a wrong token shows)."""
        try:
            return "ok", self.state()
        except ApiError as err:
            if err.code in ("unauthorized", "worker_unavailable"):
                return ("unauthorized" if err.code == "unauthorized" else "unreachable"), None
            return "error", None

    def load_local(self, name: str) -> dict:
        settings = self._settings_for(name).to_json()
        return self._call("POST", "/load_model_from_local_store", headers={"X-Model-Name": name},
                          json={"settings": settings} if settings else None).json()

    def delete(self, name: str) -> bool:
        """Delete a cached model; a model already gone counts as deleted."""
        try:
            self._call("DELETE", f"/models/{quote(check_model_name(name), safe='')}")
        except ApiError as err:
            if err.code == "model_not_cached":
                return False
            raise
        return True

    def unload(self, name: str | None = None) -> None:
        """Unload one model (after its generations finish), or every model without a name."""
        if name is None:
            self._call("POST", "/unload")
        else:
            self._call("POST", "/unload", json={"model": check_model_name(name)})

    def infer(self, model: str, request: GenerationRequest, stream_format: str = "text") -> requests.Response:
        """Start a streamed generation; raises for an error status before any text."""
        body = dict(request.to_json(), model=model, stream_format=stream_format)
        response = self._call("POST", "/infer", json=body, stream=True)
        if response.status_code >= 400:
            err = _error_from(response.status_code, response.content)
            response.close()
            raise err
        return response

    def push(self, name: str, path, size: int, sha256: str) -> float:
        """Upload a file to /cache_model in 1 MiB blocks with a Content-Length; return seconds."""
        parts = urlsplit(self.base_url)
        conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        # http.client's blocksize decides upload speed: its 8 KiB default is several times slower.
        conn = conn_cls(parts.hostname, parts.port, timeout=self.timeout_s, blocksize=BLOCK_SIZE)
        headers = dict(self._headers, **{"X-Model-Name": name, "X-Model-Sha256": sha256,
                                         "Content-Length": str(size), "Content-Type": "application/octet-stream"})
        started = time.perf_counter()
        try:
            with open(path, "rb") as f:
                conn.request("POST", "/cache_model", body=f, headers=headers)
                response = conn.getresponse()
                payload = response.read()
        except OSError as err:
            raise WorkerUnavailable(f"upload of {name} to {self.base_url} failed: {err}") from err
        finally:
            conn.close()
        if response.status >= 400:
            raise _error_from(response.status, payload)
        return time.perf_counter() - started

    def iter_text(self, response: requests.Response) -> Iterator[bytes]:
        """Pass the worker's stream through as it arrives; closing stops the worker's generation."""
        try:
            yield from response.iter_content(chunk_size=None)
        finally:
            response.close()
