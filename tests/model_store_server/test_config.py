"""Store configuration: defaults, environment, flags, and clear refusals."""

from __future__ import annotations

import subprocess
import sys

import pytest

from model_store_server.config import ConfigError, load_store_config


def test_defaults_match_the_documented_table():
    c = load_store_config([], env={})
    assert (c.models_dir.as_posix(), c.worker_url, c.max_cache_size, c.max_cache_bytes, c.ttl_seconds,
            c.cache_policy, c.transport, c.allow_fallback, c.worker_rdma_host, c.worker_rdma_port, c.port) == \
        ("models", "http://localhost:8080", 2, None, 5.0, "lru", "http", False, "localhost", 8081, 8000)


def test_environment_then_flags():
    env = {"CACHE_POLICY": "ttl", "TTL_SECONDS": "2.5", "MAX_CACHE_SIZE": "3", "ALLOW_FALLBACK": "1"}
    c = load_store_config([], env=env)
    assert (c.cache_policy, c.ttl_seconds, c.max_cache_size, c.allow_fallback) == ("ttl", 2.5, 3, True)
    assert load_store_config(["--cache-policy", "lru"], env=env).cache_policy == "lru"


@pytest.mark.parametrize("env,fragment", [
    ({"CACHE_POLICY": "fifo"}, "CACHE_POLICY"),
    ({"MAX_CACHE_SIZE": "-1"}, "MAX_CACHE_SIZE"),
    ({"MAX_CACHE_SIZE": "two"}, "MAX_CACHE_SIZE"),
    ({"MAX_CACHE_BYTES": "0"}, "MAX_CACHE_BYTES"),
    ({"CACHE_POLICY": "ttl", "TTL_SECONDS": "0"}, "TTL_SECONDS"),
    ({"CACHE_POLICY": "lru-ttl", "TTL_SECONDS": ""}, "TTL_SECONDS"),
    ({"TRANSPORT": "carrier-pigeon"}, "TRANSPORT"),
    ({"WORKER_URL": "localhost:8080"}, "WORKER_URL"),
    ({"STORE_PORT": "70000"}, "port"),
])
def test_invalid_settings_refused(env, fragment):
    with pytest.raises(ConfigError) as err:
        load_store_config([], env=env)
    assert fragment in str(err.value)


def test_cli_exits_with_message_on_bad_policy():
    proc = subprocess.run([sys.executable, "-m", "model_store_server", "--cache-policy", "fifo"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "CACHE_POLICY must be one of" in proc.stderr


def test_help_gives_every_flag_a_description_default_and_environment_variable():
    from model_store_server.config import store_parser

    parser = store_parser(env={})
    for action in parser._actions:
        if action.dest in ("help", "version"):
            continue
        text = action.help or ""
        assert "default" in text and "env " in text, (action.option_strings, text)
    proc = subprocess.run([sys.executable, "-m", "model_store_server", "--help"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "MODELS_DIR" in proc.stdout and "STORE_API_KEY" in proc.stdout


def test_version():
    from model_swap import __version__

    proc = subprocess.run([sys.executable, "-m", "model_store_server", "--version"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip() == f"model-store-server {__version__}"
