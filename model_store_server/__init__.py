"""The model store server: owns the GGUF files, decides the worker's disk and memory, forwards requests."""

from __future__ import annotations

import logging

from flask import Flask

from model_store_server.config import StoreConfig
from model_store_server.core import build_core
from model_store_server.forwarding import install_request_lines
from model_store_server.model_names import ModelNames
from model_store_server.session_chat import Sessions
from model_store_server.sessions import SessionLocks, SessionStore
from model_store_server.transport import Transport
from model_swap.auth import install_token_check
from model_swap.errors import ApiError, register_error_handlers
from model_swap.web import install_request_logging

log = logging.getLogger("model_store_server")


def create_app(config: StoreConfig, worker=None, transport: Transport | None = None) -> Flask:
    """Build the store app; its state lives in app.extensions["store"]. Tests pass a fake worker."""
    app = Flask(__name__)
    core = build_core(config, worker, transport)
    names = ModelNames(core.catalog, config.models_config)
    sessions = Sessions(SessionStore(config.sessions_db, config.session_ttl_s), SessionLocks(), config.session_bounds,
                        config.queue_timeout_s)
    app.extensions["store"] = {"config": config, "core": core, "names": names, "sessions": sessions}
    app.extensions["on_graceful_stop"] = [core.events.close]  # /events streams end, so the stop need not wait
    register_error_handlers(app)
    install_request_logging(app, log)
    install_token_check(app, config.api_key, open_endpoints={"admin.health"})
    install_request_lines(app)

    from model_store_server import (routes_admin, routes_ollama, routes_openai, routes_switch, routes_user,
                                    session_routes)

    app.register_blueprint(routes_user.bp)
    app.register_blueprint(routes_openai.bp)
    app.register_blueprint(routes_ollama.bp)
    app.register_blueprint(routes_admin.bp)
    app.register_blueprint(session_routes.bp)
    app.register_blueprint(routes_switch.bp)
    reconciled = "not yet"
    if config.reconcile_on_start:
        try:
            kept, deleted = core.reconcile()
            reconciled = f"kept on the worker: [{', '.join(kept)}], deleted on the worker: [{', '.join(deleted)}]"
        except ApiError as err:
            log.warning("worker not reconciled at start-up (%s); will retry on the next request", err.message)
    core.start()
    log.info("store ready: models=%s policy=%s workers=[%s] transport=%s keep_alive=%ss pinned=[%s] preload=[%s] "
             "models_config=%s (%d entries, %d presets) sessions=%s; %s", core.catalog.root, config.cache_policy,
             ", ".join(f"{w.name}={w.url}" for w in config.worker_specs()),
             config.transport, config.keep_alive_seconds, ", ".join(config.pinned_models),
             ", ".join(config.preload_models), config.models_config.source, len(config.models_config.entries),
             len(config.models_config.presets), config.sessions_db or "memory", reconciled)
    return app
