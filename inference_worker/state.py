"""Typed access to the worker's state on the current app."""

from __future__ import annotations

from flask import current_app

from inference_worker.engine import Engine
from inference_worker.metrics import WorkerMetrics
from inference_worker.storage import ModelCache


def cache() -> ModelCache:
    return current_app.extensions["worker"]["cache"]


def engine() -> Engine:
    return current_app.extensions["worker"]["engine"]


def metrics() -> WorkerMetrics:
    return current_app.extensions["worker"]["metrics"]


def boot_id() -> str:
    return current_app.extensions["worker"]["boot_id"]
