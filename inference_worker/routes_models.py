"""Receiving, caching, loading, listing and deleting models."""

from __future__ import annotations

import time
from typing import Iterator

from flask import Blueprint, jsonify, request

from inference_worker import state
from inference_worker.socket_body import raw_body
from model_swap.digest import BLOCK_SIZE
from model_swap.errors import ApiError
from model_swap.model_settings import ModelSettings
from model_swap.names import check_model_name
from model_swap.web import json_body

bp = Blueprint("models", __name__)


def _read_body() -> Iterator[bytes]:
    """Yield the request body in large blocks; reading in 1 MiB decides upload speed."""
    stream = request.stream
    while block := stream.read(BLOCK_SIZE):
        yield block


def _expected_digest() -> str | None:
    value = request.headers.get("X-Model-Sha256")
    if value is None:
        return None
    value = value.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ApiError(400, "invalid_request", "X-Model-Sha256 must be 64 hex digits")
    return value


def _receive() -> dict:
    """Store the body under X-Model-Name; return the receipt as JSON fields."""
    name = check_model_name(request.headers.get("X-Model-Name"))
    m = state.metrics()
    try:
        sha256 = _expected_digest()
        raw = raw_body(request.environ)
        if raw is not None:  # the fast path: no copies through the WSGI stream
            receipt = state.cache().receive_spliced(name, raw, sha256)
        else:
            receipt = state.cache().receive(name, _read_body(), request.content_length, sha256)
    except Exception:
        m.receives.labels("error").inc()
        raise
    m.receives.labels("ok").inc()
    m.bytes_received.inc(receipt.size)
    return {"name": name, "size": receipt.size, "sha256": receipt.sha256, "receive_ms": round(receipt.receive_ms, 2),
            "receive_method": receipt.method}


def _load(name: str, settings: ModelSettings = ModelSettings()) -> dict:
    """Load a cached model alongside the resident ones, opened with `settings`, counting the result."""
    cache, m = state.cache(), state.metrics()
    if not cache.contains(name):
        raise ApiError(404, "model_not_cached", f"{name} is not in the worker's cache")
    try:
        result = state.registry().load(name, cache.path_for(name), settings)
    except ApiError as err:
        m.loads.labels("insufficient_memory" if err.code == "insufficient_memory" else "error").inc()
        raise
    if not result.already_loaded:
        m.loads.labels("ok").inc()
        m.load_seconds.observe(result.load_ms / 1000)
    cache.touch(name)
    return {"loaded": name, "already_loaded": result.already_loaded, "load_ms": round(result.load_ms, 2),
            "memory_bytes": result.memory_bytes, "estimated_bytes": result.estimated_bytes}


def _optional_body() -> dict:
    """The JSON body, or {} when the request has none."""
    has_body = request.content_length or "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    return json_body() if has_body else {}


@bp.post("/load_model_from_store")
def load_model_from_store():
    """Receive a model's bytes, cache them, then load the model."""
    body = _receive()
    try:
        body.update(_load(body["name"]))
    except ApiError as err:
        if err.code == "load_failed":  # asked to load it: a file that cannot load is no use cached
            state.cache().delete(body["name"])
        raise
    return jsonify(body)


@bp.post("/cache_model")
def cache_model():
    """Receive a model's bytes into the cache without loading it."""
    return jsonify(_receive())


@bp.post("/load_model_from_local_store")
def load_model_from_local_store():
    """Load a model that is already cached; an optional JSON body {"settings": {...}} says how to open it."""
    name = check_model_name(request.headers.get("X-Model-Name"))
    return jsonify(_load(name, ModelSettings.from_json(_optional_body().get("settings"))))


@bp.get("/models")
def list_models():
    """The truth of disk and memory: the resident models, the budget and every cached file."""
    registry = state.registry()
    return jsonify({
        "boot_id": state.boot_id(),
        "loaded": registry.snapshot(),
        "memory": registry.memory(),
        "cached": [m.to_json() for m in state.cache().list()],
        "queue_depth": registry.queue_depth(),
    })


@bp.delete("/models/<name>")
def delete_model(name: str):
    """Remove a cached file, unloading it first (drained) if it is loaded."""
    check_model_name(name)
    started = time.perf_counter()
    unloaded = state.registry().unload(name)
    if not state.cache().delete(name) and not unloaded:
        raise ApiError(404, "model_not_cached", f"{name} is not in the worker's cache")
    return jsonify({"deleted": name, "unloaded": unloaded,
                    "elapsed_ms": round((time.perf_counter() - started) * 1000, 2)})


@bp.post("/unload")
def unload():
    """Unload {"model": name} once its generations finish; without a body, every model."""
    model = _optional_body().get("model")
    if model is None:
        return jsonify({"unloaded": state.registry().unload_all()})
    check_model_name(model)
    return jsonify({"unloaded": [model] if state.registry().unload(model) else []})
