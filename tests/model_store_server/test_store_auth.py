"""Tokens between user, store and worker, with real services: STORE_API_KEY, the worker's token, /health."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests

PROMPT = {"prompt": "hello", "max_tokens": 2}


@pytest.fixture
def models_dir(make_model, tmp_path):
    d = tmp_path / "store-models"
    make_model(d, "a.gguf", seed=1)
    return d


def test_store_health_reports_a_wrong_worker_token(services, models_dir):
    worker = services.worker(token="t0ken")
    store = services.store(models_dir, worker, token="wrong")
    body = requests.get(store.url + "/health", timeout=10).json()
    assert body["worker"] == "unauthorized"
    right = services.store(models_dir, worker, token="t0ken")
    assert requests.get(right.url + "/health", timeout=10).json()["worker"] == "ok"


def test_store_api_key_guards_every_endpoint_but_health(services, models_dir):
    worker = services.worker()
    store = services.store(models_dir, worker, extra=["--api-key", "k3y"])
    assert requests.get(store.url + "/health", timeout=10).status_code == 200
    for method, path, body in [("get", "/models", None), ("get", "/metrics", None), ("get", "/v1/models", None),
                               ("post", "/user_request", {**PROMPT, "model": "a.gguf"}),
                               ("post", "/v1/completions", {**PROMPT, "model": "a.gguf"}),
                               ("post", "/admin/reset", None), ("post", "/admin/prefetch", {"model": "a.gguf"}),
                               ("get", "/sessions/s1", None), ("delete", "/sessions/s1", None),
                               ("post", "/admin/load", {"model": "a.gguf"}),
                               ("post", "/admin/switch", {"model": "a.gguf"})]:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = requests.request(method, store.url + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", (path, headers)
    assert sorted(worker.cache_dir.iterdir()) == []
    r = requests.post(store.url + "/user_request", json={**PROMPT, "model": "a.gguf"},
                      headers={"Authorization": "bearer k3y"}, timeout=60)
    assert r.status_code == 200 and r.content


@pytest.mark.parametrize("argv,ok", [([], False), (["--insecure-no-token"], True)])
def test_store_refuses_a_public_bind_without_a_key(tmp_path, argv, ok):
    from model_store_server.config import ConfigError, load_store_config

    if ok:
        assert load_store_config(["--host", "0.0.0.0", *argv], env={}).host == "0.0.0.0"
        return
    with pytest.raises(ConfigError, match="STORE_API_KEY"):
        load_store_config(["--host", "0.0.0.0"], env={})
    proc = subprocess.run([sys.executable, "-m", "model_store_server", "--host", "0.0.0.0", "--models-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "STORE_API_KEY" in proc.stderr
    assert load_store_config(["--host", "0.0.0.0"], env={"STORE_API_KEY": "k"}).api_key == "k"
