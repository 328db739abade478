"""The inference worker: a disk cache of GGUF files and the llama.cpp models resident in memory."""

from __future__ import annotations

import logging
import os
import uuid

# llama.cpp's CPU backend runs its threads on libgomp, which reads these when llama.cpp loads, so
# they are set before any module here imports llama_cpp; a value the user exported wins. With one
# decode thread per loaded model (and request threads) the worker manages more OpenMP threads than
# cores, and libgomp then spins only 100 rounds before putting a thread to sleep between ops: one
# stream fell from about 125 to 50 tok/s once a second model had been loaded. ACTIVE raises that to
# 1000 rounds; GOMP_SPINCOUNT keeps the spin of an unthrottled team at libgomp's default (~3 ms)
# rather than ACTIVE's minutes, so an idle worker does not burn its cores.
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "300000")

from flask import Flask

from inference_worker.config import WorkerConfig
from inference_worker.engine import prepare_llama
from inference_worker.memory import Budget, detect_budget
from inference_worker.metrics import WorkerMetrics
from inference_worker.registry import LlamaSettings, ModelRegistry
from inference_worker.storage import ModelCache
from model_swap.auth import install_token_check
from model_swap.errors import register_error_handlers
from model_swap.web import install_request_logging

log = logging.getLogger("inference_worker")


def _build_registry(config: WorkerConfig, metrics: WorkerMetrics) -> ModelRegistry:
    budget = (Budget(config.memory_budget_bytes, "MEMORY_BUDGET_BYTES") if config.memory_budget_bytes is not None
              else detect_budget())
    log.info("memory budget %d bytes (%.2f GiB), %s; at most %d models loaded", budget.bytes, budget.bytes / (1 << 30),
             budget.source, config.max_loaded_models)
    prepare_llama()
    settings = LlamaSettings(config.n_ctx, config.n_gpu_layers, config.n_threads, config.n_threads_batch,
                             config.n_parallel, config.batch_invariant, config.flash_attn)
    return ModelRegistry(settings, budget, config.max_loaded_models, config.unload_drain_timeout_s,
                         on_step=metrics.observe_step)


def create_app(config: WorkerConfig, registry: ModelRegistry | None = None) -> Flask:
    """Build the worker app; its state lives in app.extensions["worker"]."""
    app = Flask(__name__)
    cache = ModelCache(config.cache_dir, config.max_model_bytes, config.reserve_disk_bytes)
    cache.remove_partial_files()
    metrics = WorkerMetrics()
    app.extensions["worker"] = {
        "config": config,
        "cache": cache,
        "registry": registry or _build_registry(config, metrics),
        "metrics": metrics,
        "boot_id": uuid.uuid4().hex,  # changes at every start: a client can tell a restarted worker
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
    log.info("worker ready: cache=%s token=%s n_threads=%d n_threads_batch=%d n_parallel=%d", cache.root,
             "set" if config.token else "none", config.n_threads, config.n_threads_batch, config.n_parallel)
    return app
