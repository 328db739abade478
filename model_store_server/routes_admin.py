"""Admin: reset the worker's cache, prefetch a model; listing, health and metrics."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from model_store_server.model_names import model_names
from model_store_server.swapper import Swapper
from model_swap.errors import ApiError
from model_swap.web import json_body

bp = Blueprint("admin", __name__)
log = logging.getLogger(__name__)


def _swapper() -> Swapper:
    return current_app.extensions["store"]["swapper"]


@bp.post("/admin/reset")
def reset():
    """Unload and delete everything on the worker; empty the policy."""
    outcome = _swapper().reset()
    return jsonify({"status": "reset", "deleted": list(outcome.evicted)})


@bp.post("/admin/prefetch")
def prefetch():
    """Put a model in the worker's cache without loading it."""
    name = model_names().resolve(json_body().get("model"))
    outcome = _swapper().prefetch(name)
    log.info("[/admin/prefetch] model=%s action=%s evicted=[%s] cached=[%s]", name, outcome.action,
             ", ".join(outcome.evicted), ", ".join(outcome.cached))
    return jsonify({"model": name, "action": outcome.action, "evicted": list(outcome.evicted),
                    "cached": outcome.cached, "transport": outcome.transport})


@bp.get("/models")
def models():
    """The store's models and what the worker holds."""
    swapper = _swapper()
    config = current_app.extensions["store"]["config"]
    try:
        worker = swapper.worker_state()
        worker_view = {"reachable": True, "loaded": list(worker.loaded), "cached": [c["name"] for c in worker.cached]}
    except ApiError:
        worker_view = {"reachable": False, "loaded": [], "cached": []}
    usable, unusable = swapper.catalog.scan()
    return jsonify({
        "models": [m.to_json() for m in usable],
        "unusable": [u.to_json() for u in unusable],
        "policy": {"name": config.cache_policy, "cached": swapper.cached(), "loaded": swapper.loaded(),
                   "max_cache_size": config.max_cache_size, "max_cache_bytes": config.max_cache_bytes,
                   "ttl_seconds": config.ttl_seconds},
        "worker": worker_view,
        "scheduler": swapper.scheduler.snapshot(),
    })


@bp.get("/health")
def health():
    """Liveness of the store, and whether the worker answers an authenticated call."""
    return jsonify({"status": "ok", "worker": _swapper().worker_status()})


@bp.get("/metrics")
def metrics():
    """Prometheus text format."""
    registry = current_app.extensions["store"]["metrics"].registry
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
