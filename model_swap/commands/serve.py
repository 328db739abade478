"""`model-swap serve`: the worker and the store with the real models, until Ctrl-C or either exits."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Mapping

from rich.console import Console

from model_swap.cli import add_setting, add_switch
from model_swap.commands.client import StoreClient
from model_swap.commands.views import size
from model_swap.testing import ServiceProcess

POLL_S = 0.5


def add_arguments(p: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    add_setting(p, env, "--store-port", "STORE_PORT", 8000, "the store's port")
    add_setting(p, env, "--worker-port", "WORKER_PORT", 8080, "the worker's port")
    add_setting(p, env, "--models-dir", "MODELS_DIR", "./models", "the store's models (the real ones are fetched here)")
    add_setting(p, env, "--models-config", "MODELS_CONFIG", "./models.toml",
                "names and per-model settings; empty for none (a missing default file is skipped)")
    add_setting(p, env, "--cache-dir", "MODEL_CACHE_DIR", None,
                "the worker's cache (default ./model_cache/STORE_PORT: one per instance)")
    add_setting(p, env, "--run-dir", "RUN_DIR", None, "the services' logs (default ./run/STORE_PORT)")
    add_switch(p, env, "--no-fetch", "NO_FETCH", "serve MODELS_DIR as it is; do not fetch the real models")


def _in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def serve(args: argparse.Namespace, out: Console, err: Console) -> int:
    """Fetch the models, start the worker then the store, list the models, and wait."""
    store_port, worker_port = int(args.store_port), int(args.worker_port)
    models_dir = Path(args.models_dir)
    cache_dir = Path(args.cache_dir or f"./model_cache/{store_port}")
    run_dir = Path(args.run_dir or f"./run/{store_port}")
    config = args.models_config
    if config == "./models.toml" and not Path(config).is_file():
        config = ""  # the default file belongs to a checkout; elsewhere, serve without one
    if not args.no_fetch:
        from model_store_server.fetch_models import main as fetch

        err.print(f"fetching the real models into {models_dir} (verified by size and sha256)")
        if fetch(["--dest", str(models_dir)]) != 0:
            err.print("[red]the models could not be fetched[/red]; --no-fetch serves MODELS_DIR as it is")
            return 1
    for name, port, flag in (("worker", worker_port, "--worker-port"), ("store", store_port, "--store-port")):
        if _in_use(port):
            err.print(f"[red]port {port} (the {name}'s) is already in use[/red], perhaps by another serve; "
                      f"stop that or pass {flag}")
            return 1
    run_dir.mkdir(parents=True, exist_ok=True)
    worker = ServiceProcess("inference_worker", ["--cache-dir", str(cache_dir)], run_dir / "worker.log", worker_port)
    store_args = ["--models-dir", str(models_dir), "--worker-url", worker.url,
                  *(["--models-config", config] if config else [])]
    # RUN_DIR: a store with chat sessions keeps its sessions.db there, as under serve.sh.
    store = ServiceProcess("model_store_server", store_args, run_dir / "store.log", store_port,
                           env={"RUN_DIR": str(run_dir)})
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for service in (worker, store):
            try:
                service.start(timeout_s=120)
            except RuntimeError as failure:
                err.print(f"[red]{service.module} did not start[/red] (log in {service.log_path}):\n{failure}",
                          markup=False)
                return 1
        listing = StoreClient(store.url, os.environ.get("STORE_API_KEY") or None).get("/models")
        err.print(f"worker on :{worker_port} (cache {cache_dir}), store on :{store_port} (logs in {run_dir}); models:")
        for model in listing.get("models", []):
            err.print(f"    {model['name']} {size(model.get('size'))}")
        out.print(f"Ready: {store.url}   try: model-swap --url {store.url} chat MODEL   Ctrl-C stops both.")
        while not stop.wait(POLL_S):
            for service in (worker, store):
                if service.proc.poll() is not None:
                    err.print(f"[red]the {service.module} exited ({service.proc.returncode})[/red]; stopping the "
                              f"other. Last lines of {service.log_path}:")
                    err.print("\n".join(service.log().splitlines()[-20:]), markup=False)
                    return 1
        err.print("stopping")
        return 0
    finally:
        store.stop()
        worker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
