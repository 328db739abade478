"""Forward one generation to the worker: lease the model, start the stream, release at its end."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator

import requests
from flask import Flask, Response, g, request

from model_store_server.outcome import Lease, Outcome, SwapFailed
from model_store_server.swapper import STALE_CODES, Swapper
from model_swap.errors import ApiError
from model_swap.web import GenerationRequest

log = logging.getLogger(__name__)


@dataclass
class Forward:
    """A running generation on the worker, holding its lease until closed."""

    swapper: Swapper
    lease: Lease
    upstream: requests.Response

    @property
    def outcome(self) -> Outcome:
        return self.lease.outcome

    def chunks(self) -> Iterator[bytes]:
        """The worker's bytes as they arrive; the lease ends with the stream or the client."""
        try:
            yield from self.swapper.worker.iter_text(self.upstream)
        except Exception:
            self.swapper.mark_stale()
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
        response.headers.update(self.outcome.headers())
        response.headers["X-Accel-Buffering"] = "no"
        return response


GENERATION_ENDPOINTS = frozenset({"user.user_request", "openai.completions", "openai.chat_completions",
                                  "ollama.generate", "ollama.chat"})


def install_request_lines(app: Flask) -> None:
    """One `[<endpoint>]` line per generation request, whatever became of it (error=CODE when it failed)."""

    @app.after_request
    def _log_generation(response: Response) -> Response:
        if request.endpoint not in GENERATION_ENDPOINTS:
            return response
        error = None
        if response.status_code >= 400:
            body = response.get_json(silent=True) or {}
            envelope = body.get("error")  # Ollama's routes answer {"error": "message", "code": ...}
            code = envelope.get("code") if isinstance(envelope, dict) else body.get("code")
            error = code or f"http_{response.status_code}"
        store = app.extensions["store"]
        model = g.get("model")
        outcome = g.get("outcome") or Outcome(cached=store["swapper"].cached())
        log_request(request.path, store["config"].cache_policy, model if isinstance(model, str) else "-",
                    outcome, error)
        return response


def log_request(endpoint: str, policy: str, model: str, outcome: Outcome, error: str | None = None) -> None:
    """The one line per request, with the cache contents after it (and the error, if it failed)."""
    ts = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    transport = f" transport={outcome.transport}" if outcome.transport else ""
    log.info("[%s] ts=%s policy=%s model=%s action=%s decision_ms=%.2f worker_ms=%.1f%s cached=[%s] evicted=[%s]%s",
             endpoint, ts, policy, model, outcome.action, outcome.decision_ms, outcome.worker_ms, transport,
             ", ".join(outcome.cached), ", ".join(outcome.evicted), f" error={error}" if error else "")


def take_lease(swapper: Swapper, model: str) -> Lease:
    """swapper.lease(model), noting the model and what the swap did for the request's log line."""
    g.model = model
    try:
        lease = swapper.lease(model)
    except SwapFailed as err:
        g.outcome = err.outcome
        raise
    g.outcome = lease.outcome
    return lease


def start_generation(swapper: Swapper, model: str, generation: GenerationRequest,
                     stream_format: str = "text") -> Forward:
    """Make sure `model` is loaded and start generating; one retry if the worker forgot it."""
    for attempt in (1, 2):
        lease = take_lease(swapper, model)
        try:
            upstream = swapper.worker.infer(model, generation, stream_format)
            break
        except ApiError as err:
            lease.release()
            err.headers.update(lease.outcome.headers())  # the swap happened even if generation did not
            if err.code in STALE_CODES:
                swapper.mark_stale()
            # A restarted worker forgets what it had loaded: reconcile and try once more.
            if err.code != "model_not_loaded" or attempt == 2:
                raise
            swapper.worker_lost_model()
            log.warning("[%s] worker no longer has %s loaded; reconciling and retrying", request.path, model)
        except BaseException:
            lease.release()
            swapper.mark_stale()
            raise
    return Forward(swapper, lease, upstream)
