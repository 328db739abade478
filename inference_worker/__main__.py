"""`python -m inference_worker` / `inference-worker`: validate config, then serve."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

from inference_worker.config import ConfigError, check_cache_dir, load_worker_config
from model_swap.serving import configure_logging, serve


def _private_stderr() -> TextIO:
    """A copy of stderr that llama-cpp-python cannot silence: while it loads a model it points
    file descriptors 1 and 2 at /dev/null, and other threads' log lines would be lost."""
    return os.fdopen(os.dup(2), "w", buffering=1)


def main(argv: list[str] | None = None) -> int:
    """Start the worker under gunicorn."""
    configure_logging(stream=_private_stderr())
    try:
        config = load_worker_config(argv)
        check_cache_dir(config.cache_dir)
    except ConfigError as err:
        logging.getLogger(__name__).error("inference-worker: %s", err)
        return 2
    logging.getLogger().setLevel(config.log_level.upper())
    logging.getLogger(__name__).info("starting worker on %s:%d", config.host, config.port)
    from inference_worker import create_app

    serve(lambda: create_app(config), config.host, config.port, config.threads, config.log_level,
          config.request_timeout_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
