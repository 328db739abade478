"""Worker configuration: defaults, environment, flags, and clear refusals."""

from __future__ import annotations

import pytest

from inference_worker.config import ConfigError, load_worker_config


def test_defaults():
    c = load_worker_config([], env={})
    assert (c.port, c.host, c.n_gpu_layers, c.n_ctx, c.token, c.rdma_port) == (8080, "127.0.0.1", -1, 2048, None, None)


def test_environment_and_flags():
    env = {"MODEL_CACHE_DIR": "/tmp/x", "N_CTX": "512", "WORKER_TOKEN": "t"}
    c = load_worker_config(["--n-gpu-layers", "0"], env=env)
    assert (str(c.cache_dir), c.n_ctx, c.token, c.n_gpu_layers) == ("/tmp/x", 512, "t", 0)


@pytest.mark.parametrize("argv,fragment", [
    (["--port", "0"], "port"),
    (["--n-ctx", "abc"], "N_CTX"),
    (["--max-model-bytes", "0"], "max model bytes"),
    (["--host", "0.0.0.0"], "WORKER_TOKEN"),
])
def test_invalid_settings_refused(argv, fragment):
    with pytest.raises(ConfigError) as err:
        load_worker_config(argv, env={})
    assert fragment in str(err.value)


def test_public_bind_allowed_with_token_or_explicit_flag():
    assert load_worker_config(["--host", "0.0.0.0", "--token", "t"], env={}).host == "0.0.0.0"
    assert load_worker_config(["--host", "0.0.0.0", "--insecure-no-token"], env={}).allow_insecure
