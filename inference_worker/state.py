"""Typed access to the worker's state on the current app."""

from __future__ import annotations

from flask import current_app

from inference_worker.metrics import WorkerMetrics
from inference_worker.registry import ModelRegistry
from inference_worker.storage import ModelCache


def cache() -> ModelCache:
    return current_app.extensions["worker"]["cache"]


def registry() -> ModelRegistry:
    return current_app.extensions["worker"]["registry"]


def metrics() -> WorkerMetrics:
    return current_app.extensions["worker"]["metrics"]


def boot_id() -> str:
    return current_app.extensions["worker"]["boot_id"]
