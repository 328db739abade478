"""Health and metrics."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST

from inference_worker import state

bp = Blueprint("ops", __name__)


@bp.get("/health")
def health():
    """Liveness: answers without a token."""
    return jsonify({"status": "ok", "loaded": state.registry().loaded_names(), "boot_id": state.boot_id()})


@bp.get("/metrics")
def metrics():
    """Prometheus text format."""
    registry = state.registry()
    return Response(state.metrics().exposition(registry.snapshot(), registry.memory()), mimetype=CONTENT_TYPE_LATEST)
