"""Forward one generation to the worker: lease the model, start the stream, release at its end."""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator

from flask import Response

from model_store_server.core import StoreCore
from model_store_server.executor import Lease, Outcome
from model_store_server.worker_client import WorkerUnavailable
from model_swap.errors import ApiError
from model_swap.web import GenerationRequest

log = logging.getLogger(__name__)
# The worker no longer has the model we believed loaded (it restarted, or is unloading it): retry once.
RETRY_CODES = frozenset({"model_not_loaded", "model_unloading"})
DURATION_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


@dataclass
class Forward:
    """A running generation on the worker, holding its lease until closed."""

    store: StoreCore
    lease: Lease
    upstream: object
    outcome: Outcome

    def chunks(self) -> Iterator[bytes]:
        """The worker's bytes as they arrive; the lease ends with the stream or the client."""
        try:
            yield from self.lease.executor.worker.iter_text(self.upstream)
        except Exception:
            self.store.worker_failed(self.lease, WorkerUnavailable("the worker's stream broke off"))
            log.exception("[forward] worker stream broke off")
        finally:
            self.lease.release()

    def close(self) -> None:
        """End everything, also for a stream that was never iterated (its finally would not run)."""
        self.upstream.close()
        self.lease.release()

    def attach(self, response: Response) -> Response:
        """Tie the lease to the response's close and add the cache headers."""
        response.call_on_close(self.close)
        response.headers.update(cache_headers(self.outcome))
        return response


def cache_headers(outcome: Outcome) -> dict[str, str]:
    """What the request caused, for the response headers."""
    return {
        "X-Cache-Action": outcome.action or "",
        "X-Cache-Evicted": ",".join(outcome.evicted),
        "X-Cache-Unloaded": ",".join(outcome.unloaded),
        "X-Decision-Ms": f"{outcome.decision_ms:.2f}",
        "X-Worker-Ms": f"{outcome.worker_ms:.1f}",
        "X-Queue-Ms": f"{max(0.0, outcome.queue_ms):.1f}",
        "X-Transport": outcome.transport,
        "X-Accel-Buffering": "no",
    }


def log_request(endpoint: str, policy: str, model: str, outcome: Outcome, error: str | None = None) -> None:
    """The one line per request, with both tiers after it (and the error, if it failed)."""
    ts = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    transport = f" transport={outcome.transport}" if outcome.transport else ""
    log.info("[%s] ts=%s policy=%s model=%s action=%s decision_ms=%.2f worker_ms=%.1f queue_ms=%.1f%s cached=[%s] "
             "evicted=[%s] unloaded=[%s] loaded=[%s]%s", endpoint, ts, policy, model, outcome.action or "none",
             outcome.decision_ms, outcome.worker_ms, max(0.0, outcome.queue_ms), transport,
             ", ".join(outcome.cached), ", ".join(outcome.evicted), ", ".join(outcome.unloaded),
             ", ".join(outcome.loaded), f" error={error}" if error else "")


def keep_alive_of(body: dict) -> float | None:
    """The request's `keep_alive` (seconds, or "30s", "5m", "1h"; negative: never unload), or None."""
    value = body.get("keep_alive")
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = DURATION_RE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ApiError(400, "invalid_request", 'keep_alive must be seconds or a duration like "30s", "5m", "1h"')
    return float(match.group(1)) * UNITS_S[match.group(2)]


def start_generation(store: StoreCore, endpoint: str, model: str, request: GenerationRequest,
                     stream_format: str = "text", keep_alive_s: float | None = None) -> Forward:
    """Make sure `model` is loaded and start generating; one retry if the worker lost it. One log line."""
    outcome = Outcome()
    try:
        for attempt in (1, 2):
            lease = store.lease(model, keep_alive_s, outcome)
            try:
                upstream = lease.executor.worker.infer(model, request, stream_format)
                break
            except ApiError as err:
                lease.release()
                store.worker_failed(lease, err)
                if err.code not in RETRY_CODES or attempt == 2:
                    raise
                log.warning("[%s] the worker no longer has %s loaded; reconciling and retrying", endpoint, model)
            except BaseException:
                lease.release()
                store.worker_failed(lease, WorkerUnavailable(f"starting a generation of {model} failed"))
                raise
    except ApiError as err:
        if not outcome.cached:
            outcome.cached, outcome.loaded = store.tiers(model)
        log_request(endpoint, store.policy_name, model, outcome, error=err.code)
        if outcome.action is not None:  # a decision was made: report what it did, even on failure
            err.headers.update(cache_headers(outcome))
        raise
    log_request(endpoint, store.policy_name, model, outcome)
    return Forward(store, lease, upstream, outcome)


class PendingForward:
    """start_generation on its own thread, so a streaming response can say it is waiting meanwhile."""

    def __init__(self, store: StoreCore, endpoint: str, model: str, request: GenerationRequest, stream_format: str,
                 keep_alive_s: float | None):
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._forward: Forward | None = None
        self._error: BaseException | None = None
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, args=(store, endpoint, model, request, stream_format,
                                                                keep_alive_s), daemon=True, name="pending-forward")
        self._thread.start()

    def _run(self, *args) -> None:
        try:
            forward = start_generation(*args)
        except BaseException as err:  # handed to the waiting response
            self._error = err
            self._done.set()
            return
        with self._lock:
            self._forward = forward
            abandoned = self._abandoned
        self._done.set()
        if abandoned:
            forward.close()  # the client left while we waited: give the model back at once

    def wait(self, timeout_s: float) -> bool:
        return self._done.wait(timeout_s)

    def result(self) -> Forward:
        """The started generation, or the error that stopped it."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._forward

    def abandon(self) -> None:
        """The client went away: whatever arrives later is closed."""
        with self._lock:
            self._abandoned = True
            forward = self._forward
        if forward is not None:
            forward.close()
