"""Run a Flask app factory under gunicorn: one process, many threads."""

from __future__ import annotations

import logging
from typing import Callable, TextIO

from flask import Flask
from gunicorn.app.base import BaseApplication

from model_swap.guarded_worker import GuardedThreadWorker

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send every log line to stderr (or `stream`) in one format."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=stream)


class _GunicornApp(BaseApplication):
    """Gunicorn application that builds the Flask app inside the worker process."""

    def __init__(self, factory: Callable[[], Flask], options: dict):
        self._factory = factory
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        # Built here, after the fork, so threads the app starts live in the serving process.
        return self._factory()


def serve(factory: Callable[[], Flask], host: str, port: int, threads: int, log_level: str,
          request_timeout_s: float = 30.0) -> None:
    """Serve with one guarded gthread worker: model and cache state live in process memory.

    A request must arrive within request_timeout_s, and a client may stall reading a response
    for no longer than that (see guarded_worker).
    """
    worker_class = type("GuardedThreadWorker", (GuardedThreadWorker,), {"request_timeout_s": request_timeout_s})
    options = {
        "bind": f"{host}:{port}",
        "workers": 1,
        "worker_class": worker_class,
        "threads": threads,
        # Streams and uploads can be long; gthread workers heartbeat on their own.
        "timeout": 600,
        "graceful_timeout": 10,
        "keepalive": 5,
        "loglevel": log_level.lower(),
        "accesslog": None,
    }
    _GunicornApp(factory, options).run()
