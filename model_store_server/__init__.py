"""The model store server: owns the GGUF files, decides the worker's cache, forwards requests."""

from __future__ import annotations

import logging

from flask import Flask

from model_store_server.catalog import Catalog
from model_store_server.config import StoreConfig
from model_store_server.forwarding import install_request_lines
from model_store_server.metrics import StoreMetrics
from model_store_server.model_names import ModelNames
from model_store_server.policy import build_policy
from model_store_server.swapper import Swapper
from model_store_server.transport import build_transport
from model_store_server.worker_client import WorkerClient
from model_swap.auth import install_token_check
from model_swap.errors import ApiError, register_error_handlers
from model_swap.web import install_request_logging

log = logging.getLogger("model_store_server")


def create_app(config: StoreConfig) -> Flask:
    """Build the store app; its state lives in app.extensions["store"]."""
    app = Flask(__name__)
    worker = WorkerClient(config.worker_url, config.worker_token, config.worker_timeout_s,
                          config.models_config.settings_for)
    metrics = StoreMetrics()
    policy = build_policy(config.cache_policy, config.max_cache_size, config.max_cache_bytes, config.ttl_seconds)
    swapper = Swapper(Catalog(config.models_dir), policy, worker, build_transport(config, worker), metrics)
    names = ModelNames(swapper.catalog, config.models_config)
    app.extensions["store"] = {"config": config, "swapper": swapper, "metrics": metrics, "names": names}
    register_error_handlers(app)
    install_request_logging(app, log)
    install_token_check(app, config.api_key, open_endpoints={"admin.health"})
    install_request_lines(app)

    from model_store_server import routes_admin, routes_ollama, routes_openai, routes_user

    app.register_blueprint(routes_user.bp)
    app.register_blueprint(routes_openai.bp)
    app.register_blueprint(routes_ollama.bp)
    app.register_blueprint(routes_admin.bp)
    reconciled = "not yet"
    if config.reconcile_on_start:
        try:
            outcome = swapper.reconcile()
            reconciled = (f"kept on the worker: [{', '.join(outcome.cached)}], "
                          f"deleted on the worker: [{', '.join(outcome.evicted)}]")
        except ApiError as err:
            log.warning("worker not reconciled at start-up (%s); will retry on the next request", err.message)
    log.info("store ready: models=%s policy=%s worker=%s transport=%s models_config=%s (%d entries); %s",
             swapper.catalog.root, config.cache_policy, config.worker_url, config.transport,
             config.models_config.source, len(config.models_config.entries), reconciled)
    return app
