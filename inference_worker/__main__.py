"""`python -m inference_worker` / `inference-worker`: validate config, then serve."""

from __future__ import annotations

import logging
import sys

from inference_worker.config import ConfigError, load_worker_config
from model_swap.serving import configure_logging, serve


def main(argv: list[str] | None = None) -> int:
    """Start the worker under gunicorn."""
    configure_logging()
    try:
        config = load_worker_config(argv)
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
