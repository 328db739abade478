"""The inference worker: a disk cache of GGUF files and one loaded llama.cpp model."""

from __future__ import annotations

import logging
import uuid

from flask import Flask

from inference_worker.config import WorkerConfig
from inference_worker.engine import Engine
from inference_worker.metrics import WorkerMetrics
from inference_worker.storage import ModelCache
from model_swap.auth import install_token_check
from model_swap.errors import register_error_handlers
from model_swap.web import install_request_logging

log = logging.getLogger("inference_worker")


def create_app(config: WorkerConfig, engine: Engine | None = None) -> Flask:
    """Build the worker app; its state lives in app.extensions["worker"]."""
    app = Flask(__name__)
    cache = ModelCache(config.cache_dir, config.max_model_bytes, config.reserve_disk_bytes)
    cache.remove_partial_files()
    app.extensions["worker"] = {
        "config": config,
        "cache": cache,
        "engine": engine or Engine(config.n_ctx, config.n_gpu_layers),
        "metrics": WorkerMetrics(),
        # Tells the store that this is a new process: whatever it believed about the last one is void.
        "boot_id": uuid.uuid4().hex,
    }
    register_error_handlers(app)
    install_request_logging(app, log)
    install_token_check(app, config.token, open_endpoints={"ops.health"})

    from inference_worker import routes_infer, routes_models, routes_ops

    app.register_blueprint(routes_models.bp)
    app.register_blueprint(routes_infer.bp)
    app.register_blueprint(routes_ops.bp)
    if config.rdma_port is not None:
        from inference_worker.rdma_listener import start_rdma_listener

        app.extensions["worker"]["rdma"] = start_rdma_listener(config, cache, app.extensions["worker"]["metrics"])
    log.info("worker ready: cache=%s token=%s", cache.root, "set" if config.token else "none")
    return app
