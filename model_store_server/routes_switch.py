"""Admin: make a model resident (load), or switch to it with memory snapshots."""

from __future__ import annotations

import logging

from flask import Blueprint, jsonify

from model_store_server import state
from model_store_server.model_names import model_names
from model_swap.errors import ApiError
from model_swap.web import json_body

bp = Blueprint("switch", __name__)
log = logging.getLogger(__name__)


@bp.post("/admin/load")
def admin_load():
    """Put a model in the worker's memory now (transferring it first if needed), unloading what must go."""
    name = model_names().resolve(json_body().get("model"))
    outcome = state.core().load(name)
    log.info("[/admin/load] model=%s action=%s unloaded=[%s] evicted=[%s] loaded=[%s]", name, outcome.action,
             ", ".join(outcome.unloaded), ", ".join(outcome.evicted), ", ".join(outcome.loaded))
    return jsonify({"model": name, "action": outcome.action, "unloaded": outcome.unloaded,
                    "evicted": outcome.evicted, "cached": outcome.cached, "loaded": outcome.loaded,
                    "transport": outcome.transport})


@bp.post("/admin/switch")
def admin_switch():
    """Make a model resident now, draining what must be unloaded (with "exclusive": true, every other
    unpinned model); report the worker's memory at each step."""
    body = json_body()
    name = model_names().resolve(body.get("model"))
    exclusive = body.get("exclusive", False)
    if not isinstance(exclusive, bool):
        raise ApiError(400, "invalid_request", "exclusive must be true or false", param="exclusive")
    return jsonify(state.core().switch(name, exclusive).to_json())
