"""POST /user_request: make sure the model is loaded, then stream the worker's text back."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Iterator

from flask import Blueprint, Response, current_app

from model_store_server.swapper import STALE_CODES, Lease, Outcome, Swapper
from model_swap.errors import ApiError
from model_swap.names import check_model_name
from model_swap.web import generation_fields, json_body

bp = Blueprint("user", __name__)
log = logging.getLogger(__name__)


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
    prompt, max_tokens, temperature = generation_fields(body)
    model = check_model_name(body.get("model"))
    swapper: Swapper = current_app.extensions["store"]["swapper"]
    policy = current_app.extensions["store"]["config"].cache_policy

    for attempt in (1, 2):
        lease = swapper.lease(model)
        try:
            upstream = swapper.worker.infer(prompt, model, max_tokens, temperature)
            break
        except ApiError as err:
            lease.release()
            if err.code in STALE_CODES:
                swapper.mark_stale()
            # A restarted worker forgets what it had loaded: reconcile and try once more.
            if err.code != "model_not_loaded" or attempt == 2:
                raise
            swapper.worker_lost_model()
            log.warning("[/user_request] worker no longer has %s loaded; reconciling and retrying", model)
        except BaseException:
            lease.release()
            swapper.mark_stale()
            raise
    outcome = lease.outcome
    _log_line(policy, model, outcome)
    response = Response(_stream(swapper, lease, swapper.worker.iter_text(upstream)), mimetype="text/plain")
    # Closing a stream that was never iterated does not run its finally: end the lease here too.
    response.call_on_close(upstream.close)
    response.call_on_close(lease.release)
    response.headers.update({
        "X-Cache-Action": outcome.action,
        "X-Cache-Evicted": ",".join(outcome.evicted),
        "X-Decision-Ms": f"{outcome.decision_ms:.2f}",
        "X-Worker-Ms": f"{outcome.worker_ms:.1f}",
        "X-Transport": outcome.transport,
        "X-Accel-Buffering": "no",
    })
    return response
