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

from model_swap.errors import ApiError
from model_swap.model_settings import ModelSettings
from model_swap.names import check_model_name
from model_swap.web import GenerationRequest

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 5.0
SENDFILE_SLICE = 32 << 20  # 32 MiB: progress at least every few tens of ms on loopback
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
        # The worker's figures (a refused load's need_bytes): the store plans with them.
        details = {k: v for k, v in error.items() if k not in ("code", "message", "type", "param")}
    except (ValueError, KeyError, TypeError, AttributeError):
        code, message, details = "worker_error", body[:200].decode("utf-8", "replace"), {}
    if code == "internal_error":
        code = "worker_error"
    if status == 400 and code in USER_INPUT_CODES:
        return ApiError(400, code, message)  # the user's request was at fault, not the worker
    if status == 507 and code == "insufficient_storage":
        # The operator can act on it (free or grow the worker's disk): it stays 507.
        return ApiError(507, code, message, details=details)
    return ApiError(502, code, f"worker answered {status}: {message}", details=details)


@dataclass(frozen=True)
class LoadedModel:
    """One model the worker has in memory, as its listing reports it."""

    name: str
    memory_bytes: int | None = None
    estimated_bytes: int | None = None
    active: int = 0
    waiting: int = 0
    n_ctx: int | None = None  # the context it was opened with (its models-config setting, else the worker's)
    n_parallel: int = 1  # generations it runs at once (its slots; 1 for the single-stream engine)


@dataclass(frozen=True)
class WorkerState:
    """What the worker says is on its disk and in memory, and the memory it may use."""

    loaded: tuple[LoadedModel, ...]
    cached: list[dict]
    budget_bytes: int | None = None
    used_bytes: int | None = None
    max_loaded_models: int = 1
    boot_id: str | None = None

    @property
    def loaded_names(self) -> list[str]:
        return [m.name for m in self.loaded]

    @classmethod
    def from_listing(cls, body: dict) -> "WorkerState":
        """Read GET /models; a worker that holds one model at a time reports "loaded" as a name or null."""
        loaded = body.get("loaded")
        memory = body.get("memory") or {}
        if loaded is None or isinstance(loaded, str):
            models = (LoadedModel(loaded),) if loaded else ()
            return cls(models, list(body.get("cached", [])), boot_id=body.get("boot_id"))
        models = tuple(LoadedModel(str(m.get("name")), _int(m.get("memory_bytes")), _int(m.get("estimated_bytes")),
                                   _int(m.get("active")) or 0, _int(m.get("waiting")) or 0, _int(m.get("n_ctx")),
                                   max(1, _int(m.get("n_parallel")) or 1))
                       for m in loaded if isinstance(m, dict))
        return cls(models, list(body.get("cached", [])), _int(memory.get("budget_bytes")),
                   _int(memory.get("used_bytes")), _int(memory.get("max_loaded_models")) or 1, body.get("boot_id"))


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


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
        return WorkerState.from_listing(self._call("GET", "/models").json())

    def memory(self) -> dict:
        """The worker's memory now (GET /memory): its RSS, the host's available memory, GPU usage or null."""
        return self._call("GET", "/memory").json()

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
        """Unload one model (once its generations drain) or, without a name, every model."""
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

    def tokenize(self, model: str, messages: list[dict]) -> tuple[int, int]:
        """(tokens, n_ctx): the chat's prompt tokens with the loaded model's tokenizer and chat template."""
        body = self._call("POST", "/tokenize", json={"model": check_model_name(model), "messages": messages}).json()
        return int(body["tokens"]), int(body["n_ctx"])

    def push(self, name: str, path, size: int, sha256: str,
             progress: Callable[[int], None] | None = None) -> float:
        """Upload a file to /cache_model with a Content-Length, by sendfile; return seconds.

        progress(bytes_sent_so_far) is called after each slice the kernel has sent."""
        parts = urlsplit(self.base_url)
        conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(parts.hostname, parts.port, timeout=self.timeout_s)
        headers = dict(self._headers, **{"X-Model-Name": name, "X-Model-Sha256": sha256,
                                         "Content-Length": str(size), "Content-Type": "application/octet-stream"})
        started = time.perf_counter()
        send_error: OSError | None = None
        try:
            with open(path, "rb") as f:
                conn.putrequest("POST", "/cache_model", skip_accept_encoding=True)
                for key, value in headers.items():
                    conn.putheader(key, value)
                conn.endheaders()
                try:
                    # The kernel copies page cache to socket: no read into Python, no second copy.
                    # Slices only so that progress can be told; each is still one sendfile call.
                    sent = 0
                    while sent < size:
                        step = conn.sock.sendfile(f, sent, min(SENDFILE_SLICE, size - sent))
                        if step == 0:
                            break
                        sent += step
                        if progress is not None:
                            progress(sent)
                except OSError as err:
                    # The worker may have answered and closed before taking the whole body (a
                    # full disk, a refused name): its answer is already in our receive buffer.
                    send_error, sent = err, None
                if sent is not None and sent != size:
                    raise WorkerUnavailable(f"upload of {name}: {path} ended after {sent} of {size} bytes")
                response = conn.getresponse()
                payload = response.read()
        except (OSError, http.client.HTTPException) as err:
            cause = send_error or err
            raise WorkerUnavailable(f"upload of {name} to {self.base_url} failed: {cause}") from cause
        finally:
            conn.close()
        if response.status >= 400:
            raise _error_from(response.status, payload)
        if send_error is not None:  # a success after a broken upload cannot be trusted
            raise WorkerUnavailable(f"upload of {name} to {self.base_url} failed: {send_error}") from send_error
        return time.perf_counter() - started

    def iter_text(self, response: requests.Response) -> Iterator[bytes]:
        """Pass the worker's stream through as it arrives; closing stops the worker's generation."""
        try:
            yield from response.iter_content(chunk_size=None)
        finally:
            response.close()


