"""Health, metrics and the memory report."""

from __future__ import annotations

import time

from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST

from inference_worker import state
from inference_worker.memory import gpu_memory_usage, host_available_bytes, process_rss_bytes

bp = Blueprint("ops", __name__)


@bp.get("/health")
def health():
    """Liveness: answers without a token."""
    return jsonify({"status": "ok", "loaded": state.registry().loaded_names(), "boot_id": state.boot_id()})


@bp.get("/memory")
def memory():
    """What memory looks like now: this process's RSS, the host's available memory, each GPU's (or null)."""
    registry = state.registry()
    return jsonify({"ts": round(time.time(), 3), "rss_bytes": process_rss_bytes(),
                    "host_available_bytes": host_available_bytes(), "gpu": gpu_memory_usage(),
                    "loaded": registry.loaded_names(), **registry.memory()})


@bp.get("/metrics")
def metrics():
    """Prometheus text format."""
    registry = state.registry()
    return Response(state.metrics().exposition(registry.snapshot(), registry.memory()), mimetype=CONTENT_TYPE_LATEST)
