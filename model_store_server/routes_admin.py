"""Admin: reset, prefetch, unload and evict models; listing, events, health and metrics.

Each takes an optional worker (`"worker"` in the JSON body, or `?worker=` in the query): the
action or view then concerns that worker only; 404 unknown_worker for a name the store lacks.
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from model_store_server import state
from model_store_server.events import sse_frames
from model_store_server.model_names import model_names
from model_swap.errors import ApiError
from model_swap.web import json_body

bp = Blueprint("admin", __name__)
log = logging.getLogger(__name__)


def _worker_arg(body: dict | None = None) -> str | None:
    """The worker a request names (body "worker", else ?worker=), checked against the store's workers."""
    worker = (body or {}).get("worker", request.args.get("worker"))
    if worker is not None and not isinstance(worker, str):
        raise ApiError(400, "invalid_request", "worker must be a worker's name (a string)")
    state.core().slot_named(worker)  # 404 unknown_worker
    return worker


@bp.post("/admin/reset")
def reset():
    """Unload and delete everything on the workers (or the one named); empty their policies."""
    body = json_body() if request.content_length else {}
    outcome = state.core().reset(_worker_arg(body))
    return jsonify({"status": "reset", "deleted": list(outcome.evicted)})


@bp.post("/admin/prefetch")
def prefetch():
    """Put a model in the worker's cache without loading it."""
    body = json_body()
    name = model_names().resolve(body.get("model"))
    outcome = state.core().prefetch(name, _worker_arg(body))
    log.info("[/admin/prefetch] model=%s action=%s evicted=[%s] cached=[%s]", name, outcome.action,
             ", ".join(outcome.evicted), ", ".join(outcome.cached))
    return jsonify({"model": name, "action": outcome.action, "evicted": outcome.evicted,
                    "cached": outcome.cached, "transport": outcome.transport, "worker": outcome.worker})


def _unload(evict: bool):
    body = json_body()
    name = model_names().resolve(body.get("model"))
    outcome = state.core().unload(name, evict=evict, worker=_worker_arg(body))
    endpoint = "/admin/evict" if evict else "/admin/unload"
    log.info("[%s] model=%s unloaded=[%s] evicted=[%s] cached=[%s] loaded=[%s]", endpoint, name,
             ", ".join(outcome.unloaded), ", ".join(outcome.evicted), ", ".join(outcome.cached),
             ", ".join(outcome.loaded))
    return jsonify({"model": name, "unloaded": outcome.unloaded, "evicted": outcome.evicted,
                    "cached": outcome.cached, "loaded": outcome.loaded, "worker": outcome.worker})


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
    """The store's models, what it believes each worker holds, and what each worker says it holds.

    The top-level policy, memory, in_flight, gates and worker fields describe one worker: the one
    ?worker= names, else the first; `workers` lists them all."""
    core, config = state.core(), state.config()
    chosen = _worker_arg()
    workers = core.view()
    reports = core.worker_reports()
    for entry, report in zip(workers, reports):
        entry["report"] = report
    index = next((i for i, w in enumerate(workers) if w["name"] == chosen), 0)
    mine = workers[index]
    worker_view = reports[index]
    usable, unusable = core.catalog.scan()
    return jsonify({
        "models": [m.to_json() for m in usable],
        "unusable": [u.to_json() for u in unusable],
        "policy": {"name": config.cache_policy, "cached": mine["cached"], "loaded": [m["name"] for m in mine["loaded"]],
                   "max_cache_size": mine["max_cache_size"], "max_cache_bytes": mine["max_cache_bytes"],
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
    worker = _worker_arg()
    sub = state.core().events.subscribe()
    return Response(sse_frames(sub, worker=worker), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@bp.get("/health")
def health():
    """Liveness of the store, and whether each worker answers an authenticated call (a wrong token shows).

    `worker` sums them up: ok when every worker is, else the first one's trouble."""
    workers = state.core().worker_statuses()
    summary = next((w["status"] for w in workers if w["status"] != "ok"), "ok")  # worker_status(), one read
    return jsonify({"status": "ok", "worker": summary, "workers": workers})


@bp.get("/metrics")
def metrics():
    """Prometheus text format (the store_worker_* series carry a `worker` label)."""
    core = state.core()
    for entry in core.view():
        core.metrics.worker_resident.labels(entry["name"]).set(len(entry["loaded"]))
        core.metrics.worker_cached.labels(entry["name"]).set(len(entry["cached"]))
    return Response(generate_latest(core.metrics.registry), mimetype=CONTENT_TYPE_LATEST)
