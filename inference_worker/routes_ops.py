"""Health and metrics."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from inference_worker import state

bp = Blueprint("ops", __name__)


@bp.get("/health")
def health():
    """Liveness: answers without a token."""
    return jsonify({"status": "ok", "loaded": state.engine().loaded, "boot_id": state.boot_id()})


@bp.get("/metrics")
def metrics():
    """Prometheus text format."""
    return Response(generate_latest(state.metrics().registry), mimetype=CONTENT_TYPE_LATEST)
