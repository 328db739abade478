"""A wrong model name is answered with what the store has, and the closest names (real store)."""

from __future__ import annotations

import pytest
import requests

REAL = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def store(module_services, module_model, tmp_path_factory):
    """One worker and store for the module: wrong names change nothing."""
    models = tmp_path_factory.mktemp("names") / "models"
    for seed, name in enumerate(["a.gguf", REAL, "gemma-3-270m-q4_k_m.gguf"], start=1):
        module_model(models, name, seed=seed)  # tiny stand-ins, real names
    return module_services.store(models, module_services.worker())


@pytest.mark.parametrize("path,body,status,code,closest", [
    # A name without .gguf is looked up (file stem, config name) rather than refused: unknown, it is 404.
    ("/user_request", {"prompt": "hi", "model": "llama3"}, 404, "model_not_found", []),
    ("/user_request", {"prompt": "hi", "model": "smollm2"}, 404, "model_not_found", [REAL]),
    ("/user_request", {"prompt": "hi", "model": "../a.gguf"}, 400, "invalid_model_name", ["a.gguf"]),
    ("/user_request", {"prompt": "hi"}, 400, "invalid_model_name", []),
    ("/user_request", {"prompt": "hi", "model": "gemma.gguf"}, 404, "model_not_found", ["gemma-3-270m-q4_k_m.gguf"]),
    ("/v1/completions", {"prompt": "hi", "model": "SmolLM2-135M-Instruct.gguf"}, 404, "model_not_found", [REAL]),
    ("/admin/prefetch", {"model": "b.gguf"}, 404, "model_not_found", ["a.gguf"]),
])
def test_wrong_names_list_the_available_and_closest_models(store, path, body, status, code, closest):
    r = requests.post(store.url + path, json=body, timeout=30)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["code"] == code
    assert error["available"] == sorted(["a.gguf", REAL, "gemma-3-270m-q4_k_m.gguf"])
    assert error["closest"][:len(closest)] == closest
    for name in closest:
        assert name in error["message"]
