"""POST /user_request: make sure the model is loaded, then stream the worker's text back."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Iterator

from flask import Blueprint, Response, current_app

from model_store_server.swapper import Lease, Outcome, Swapper
from model_swap.errors import ApiError
from model_swap.names import check_model_name
from model_swap.web import int_field, json_body

bp = Blueprint("user", __name__)
log = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 512


def _log_line(policy: str, model: str, outcome: Outcome) -> None:
    ts = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    transport = f" transport={outcome.transport}" if outcome.transport else ""
    log.info("[/user_request] ts=%s policy=%s model=%s action=%s decision_ms=%.2f worker_ms=%.1f%s "
             "cached=[%s] evicted=[%s]", ts, policy, model, outcome.action, outcome.decision_ms,
             outcome.worker_ms, transport, ", ".join(outcome.cached), ", ".join(outcome.evicted))


def _stream(swapper: Swapper, lease: Lease, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Pass text through; the model stays leased until the stream ends or the client leaves."""
    try:
        yield from chunks
    except Exception:
        swapper.mark_stale()
        log.exception("[/user_request] worker stream broke off")
    finally:
        lease.release()


@bp.post("/user_request")
def user_request():
    """Stream generated text for {"prompt", "model", "max_tokens"}; headers tell the cache action."""
    body = json_body()
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "invalid_request", "prompt must be a non-empty string")
    model = check_model_name(body.get("model"))
    max_tokens = int_field(body, "max_tokens", DEFAULT_MAX_TOKENS, 1, 1 << 20)
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))):
        raise ApiError(400, "invalid_request", "temperature must be a number")
    swapper: Swapper = current_app.extensions["store"]["swapper"]
    policy = current_app.extensions["store"]["config"].cache_policy

    for attempt in (1, 2):
        lease = swapper.lease(model)
        try:
            upstream = swapper.worker.infer(prompt, model, max_tokens, temperature)
            break
        except ApiError as err:
            lease.release()
            swapper.mark_stale()
            # A restarted worker forgets what it had loaded: reconcile and try once more.
            if err.code != "model_not_loaded" or attempt == 2:
                raise
            log.warning("[/user_request] worker no longer has %s loaded; reconciling and retrying", model)
    outcome = lease.outcome
    _log_line(policy, model, outcome)
    response = Response(_stream(swapper, lease, swapper.worker.iter_text(upstream)), mimetype="text/plain")
    response.call_on_close(upstream.close)
    response.headers.update({
        "X-Cache-Action": outcome.action,
        "X-Cache-Evicted": ",".join(outcome.evicted),
        "X-Decision-Ms": f"{outcome.decision_ms:.2f}",
        "X-Worker-Ms": f"{outcome.worker_ms:.1f}",
        "X-Transport": outcome.transport,
        "X-Accel-Buffering": "no",
    })
    return response
