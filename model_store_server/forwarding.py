"""Forward one generation to the worker: lease the model, start the stream, release at its end.

Each generation request gets one `[<endpoint>]` log line, whatever became of it (`error=CODE`
when it failed), written by one after_request hook from the request's `Outcome`; a streaming
request that waits for its swap on another thread has its line written when the swap ends.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterator

from flask import Flask, Response, g, request

from model_store_server import state
from model_store_server.core import StoreCore
from model_store_server.executor import Lease
from model_store_server.ollama_format import keep_alive_seconds
from model_store_server.outcome import Outcome
from model_store_server.worker_client import WorkerUnavailable
from model_swap.errors import ApiError
from model_swap.web import GenerationRequest

log = logging.getLogger(__name__)
# The worker no longer has the model we believed loaded (it restarted, or is unloading it): retry once.
RETRY_CODES = frozenset({"model_not_loaded", "model_unloading"})
# Turns the request into what is sent, once the model is leased: (request, token counter) -> request.
Prepare = Callable[[GenerationRequest, Callable[[list[dict]], tuple[int, int]]], GenerationRequest]
GENERATION_ENDPOINTS = frozenset({"user.user_request", "openai.completions", "openai.chat_completions",
                                  "ollama.generate", "ollama.chat"})


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
        response.headers.update(self.outcome.headers())
        response.headers["X-Accel-Buffering"] = "no"
        return response


def begin_request(model: str) -> Outcome:
    """The outcome this generation request fills in; its log line reads it (see install_request_lines)."""
    g.model = model
    g.outcome = Outcome()
    return g.outcome


def install_request_lines(app: Flask) -> None:
    """One `[<endpoint>]` line per generation request, whatever became of it (error=CODE when it failed)."""

    @app.after_request
    def _log_generation(response: Response) -> Response:
        if request.endpoint not in GENERATION_ENDPOINTS or g.get("line_deferred"):
            return response
        error = None
        if response.status_code >= 400:
            body = response.get_json(silent=True) or {}
            envelope = body.get("error")  # Ollama's routes answer {"error": "message", "code": ...}
            code = envelope.get("code") if isinstance(envelope, dict) else body.get("code")
            error = code or f"http_{response.status_code}"
        model = g.get("model")
        write_request_line(state.core(), request.path, model if isinstance(model, str) else "-",
                           g.get("outcome") or Outcome(), error)
        return response


def write_request_line(store: StoreCore, endpoint: str, model: str, outcome: Outcome,
                       error: str | None = None) -> None:
    """Log the request's line; a request that failed before its lease reports both tiers as they are."""
    if not outcome.cached and not outcome.loaded:
        outcome.cached, outcome.loaded = store.tiers(model, outcome.worker or None)
    log_request(endpoint, store.policy_name, model, outcome, error)


def log_request(endpoint: str, policy: str, model: str, outcome: Outcome, error: str | None = None) -> None:
    """The one line per request, with both tiers after it (and the error, if it failed)."""
    ts = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    transport = f" transport={outcome.transport}" if outcome.transport else ""
    where = f" worker={outcome.worker} placement={outcome.placement or '-'}" if outcome.worker else ""
    log.info("[%s] ts=%s policy=%s model=%s action=%s decision_ms=%.2f worker_ms=%.1f queue_ms=%.1f%s%s cached=[%s] "
             "evicted=[%s] unloaded=[%s] loaded=[%s]%s", endpoint, ts, policy, model, outcome.action or "none",
             outcome.decision_ms, outcome.worker_ms, max(0.0, outcome.queue_ms), where, transport,
             ", ".join(outcome.cached), ", ".join(outcome.evicted), ", ".join(outcome.unloaded),
             ", ".join(outcome.loaded), f" error={error}" if error else "")


def keep_alive_of(body: dict) -> float | None:
    """The request's `keep_alive` in seconds (a number, or Ollama's durations: "30s", "5m", "1h30m"), negative
    for never unloading, or None when not given."""
    seconds = keep_alive_seconds(body.get("keep_alive"))
    return -1.0 if seconds == math.inf else seconds


def start_generation(store: StoreCore, model: str, generation: GenerationRequest, stream_format: str = "text",
                     keep_alive_s: float | None = None, outcome: Outcome | None = None,
                     prepare: Prepare | None = None) -> Forward:
    """Make sure `model` is loaded and start generating; one retry if the worker lost it.

    `outcome` says what the request caused, also when it fails; after a decision, the error
    carries the cache headers too. `prepare` (a session's history trim) runs holding the lease,
    with the worker's token count for the loaded model."""
    outcome = Outcome() if outcome is None else outcome
    try:
        for attempt in (1, 2):
            lease = store.lease(model, keep_alive_s, outcome)
            try:
                worker = lease.executor.worker
                sent = generation if prepare is None else prepare(
                    generation, lambda messages: worker.tokenize(model, messages))
                upstream = worker.infer(model, sent, stream_format)
                break
            except ApiError as err:
                lease.release()
                store.worker_failed(lease, err)
                # A worker that does not answer before any text is sent: place the request again
                # (worker_failed marked it down, so placement picks another one if there is one).
                moved = err.code == "worker_unavailable" and len(store.slots) > 1
                if (err.code not in RETRY_CODES and not moved) or attempt == 2:
                    raise
                log.warning("[forward] worker %s %s for %s; retrying", lease.executor.name,
                            "does not answer" if moved else "no longer has it loaded", model)
            except BaseException:
                lease.release()
                store.worker_failed(lease, WorkerUnavailable(f"starting a generation of {model} failed"))
                raise
    except ApiError as err:
        if outcome.decided:  # a decision was made: report what it did, even on failure
            err.headers.update(outcome.headers())
        raise
    return Forward(store, lease, upstream, outcome)


def load_model(store: StoreCore, model: str, keep_alive_s: float | None, outcome: Outcome) -> Outcome:
    """Make sure `model` is resident without generating (Ollama's empty request); its keep-alive starts now."""
    try:
        store.lease(model, keep_alive_s, outcome).release()
    except ApiError as err:
        if outcome.decided:
            err.headers.update(outcome.headers())
        raise
    return outcome


class PendingForward:
    """start_generation on its own thread, so a streaming response can say it is waiting meanwhile."""

    def __init__(self, store: StoreCore, model: str, generation: GenerationRequest, stream_format: str,
                 keep_alive_s: float | None, outcome: Outcome, prepare: Prepare | None = None):
        self._store, self._model, self._outcome, self._prepare = store, model, outcome, prepare
        self._endpoint = request.path
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._forward: Forward | None = None
        self._error: BaseException | None = None
        self._abandoned = False
        self._finished = False
        self._owes_line = False  # the response went out before the swap ended: the line is ours to write
        self._thread = threading.Thread(target=self._run, args=(generation, stream_format, keep_alive_s),
                                        daemon=True, name="pending-forward")
        self._thread.start()

    def _run(self, generation: GenerationRequest, stream_format: str, keep_alive_s: float | None) -> None:
        forward, error = None, None
        try:
            forward = start_generation(self._store, self._model, generation, stream_format, keep_alive_s,
                                       self._outcome, self._prepare)
        except BaseException as err:  # handed to the waiting response
            error = err
        with self._lock:
            self._forward, self._error = forward, error
            self._finished = True
            abandoned, owes_line = self._abandoned, self._owes_line
        if owes_line:
            self._write_line()  # before the waiting response goes on: its line comes first
        self._done.set()
        if abandoned and forward is not None:
            forward.close()  # the client left while we waited: give the model back at once

    def take_over_line(self) -> None:
        """The response goes out before the swap ends: write the request's line when it does."""
        g.line_deferred = True
        with self._lock:
            if not self._finished:
                self._owes_line = True
                return
        self._write_line()

    def _write_line(self) -> None:
        err = self._error
        code = None if err is None else err.code if isinstance(err, ApiError) else "internal_error"
        write_request_line(self._store, self._endpoint, self._model, self._outcome, code)

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
