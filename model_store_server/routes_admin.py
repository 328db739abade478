"""Admin: reset, prefetch, unload and evict models; listing, events, health and metrics."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from model_store_server import state
from model_store_server.events import sse_frames
from model_store_server.model_names import model_names
from model_swap.web import json_body

bp = Blueprint("admin", __name__)
log = logging.getLogger(__name__)


@bp.post("/admin/reset")
def reset():
    """Unload and delete everything on the worker; empty the policy."""
    outcome = state.core().reset()
    return jsonify({"status": "reset", "deleted": list(outcome.evicted)})


@bp.post("/admin/prefetch")
def prefetch():
    """Put a model in the worker's cache without loading it."""
    name = model_names().resolve(json_body().get("model"))
    outcome = state.core().prefetch(name)
    log.info("[/admin/prefetch] model=%s action=%s evicted=[%s] cached=[%s]", name, outcome.action,
             ", ".join(outcome.evicted), ", ".join(outcome.cached))
    return jsonify({"model": name, "action": outcome.action, "evicted": outcome.evicted,
                    "cached": outcome.cached, "transport": outcome.transport})


def _unload(evict: bool):
    name = model_names().resolve(json_body().get("model"))
    outcome = state.core().unload(name, evict=evict)
    endpoint = "/admin/evict" if evict else "/admin/unload"
    log.info("[%s] model=%s unloaded=[%s] evicted=[%s] cached=[%s] loaded=[%s]", endpoint, name,
             ", ".join(outcome.unloaded), ", ".join(outcome.evicted), ", ".join(outcome.cached),
             ", ".join(outcome.loaded))
    return jsonify({"model": name, "unloaded": outcome.unloaded, "evicted": outcome.evicted,
                    "cached": outcome.cached, "loaded": outcome.loaded})


@bp.post("/admin/unload")
def admin_unload():
    """Unload a model from the worker's memory once its streams end; its file stays cached."""
    return _unload(evict=False)


@bp.post("/admin/evict")
def admin_evict():
    """Unload a model (once its streams end) and delete its file from the worker's disk."""
    return _unload(evict=True)


@bp.get("/models")
def models():
    """The store's models, what it believes each worker holds, and what the worker says it holds."""
    core, config = state.core(), state.config()
    workers = core.view()
    mine = workers[0]
    worker_view = core.worker_reports()[0]
    usable, unusable = core.catalog.scan()
    return jsonify({
        "models": [m.to_json() for m in usable],
        "unusable": [u.to_json() for u in unusable],
        "policy": {"name": config.cache_policy, "cached": mine["cached"], "loaded": [m["name"] for m in mine["loaded"]],
                   "max_cache_size": config.max_cache_size, "max_cache_bytes": config.max_cache_bytes,
                   "ttl_seconds": config.ttl_seconds},
        "memory": {**mine["memory"], "loaded": mine["loaded"], "keep_alive_seconds": config.keep_alive_seconds,
                   "pinned": list(config.pinned_models)},
        "in_flight": mine["in_flight"],
        "gates": mine["gates"],
        "worker": worker_view,
        "workers": workers,
    })


@bp.get("/events")
def events():
    """Server-sent events of what the store does (transfers with progress, loads, unloads, evictions)."""
    sub = state.core().events.subscribe()
    return Response(sse_frames(sub), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@bp.get("/health")
def health():
    """Liveness of the store, and whether the worker answers an authenticated call (a wrong token shows)."""
    return jsonify({"status": "ok", "worker": state.core().worker_status()})


@bp.get("/metrics")
def metrics():
    """Prometheus text format."""
    return Response(generate_latest(state.core().metrics.registry), mimetype=CONTENT_TYPE_LATEST)
