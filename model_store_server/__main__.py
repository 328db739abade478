"""`python -m model_store_server` / `model-store-server`: validate config, then serve."""

from __future__ import annotations

import logging
import sys

from model_store_server.config import ConfigError, load_store_config
from model_swap.serving import configure_logging, serve


def main(argv: list[str] | None = None) -> int:
    """Start the store under gunicorn."""
    configure_logging()
    log = logging.getLogger(__name__)
    try:
        config = load_store_config(argv)
    except ConfigError as err:
        log.error("model-store-server: %s", err)
        return 2
    logging.getLogger().setLevel(config.log_level.upper())
    if not config.models_dir.is_dir():
        log.error("model-store-server: MODELS_DIR %s is not a directory", config.models_dir)
        return 2
    log.info("starting store on %s:%d (policy=%s)", config.host, config.port, config.cache_policy)
    from model_store_server import create_app

    serve(lambda: create_app(config), config.host, config.port, config.threads, config.log_level,
          config.request_timeout_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
