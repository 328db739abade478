"""TRANSPORT=rdma end to end with real services where RDMA cannot work: HTTP fallback, or 502 and nothing left."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from inference_worker.testing.tiny_gguf import write_tiny_gguf
from model_swap.digest import sha256_file
from model_swap.testing import ServiceProcess, free_port

MODEL = "tiny-a.gguf"


def _rdma_device_present() -> bool:
    if importlib.util.find_spec("pyverbs") is None:
        return False
    from model_swap.errors import ApiError
    from model_swap.rdma.verbs import rdma_devices

    try:
        return bool(rdma_devices())
    except ApiError:
        return False


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(_rdma_device_present(), reason="an RDMA device is present, so RDMA would not fail")]


@dataclass
class Stack:
    worker: ServiceProcess
    store: ServiceProcess
    cache_dir: Path
    model_path: Path


@pytest.fixture
def stack(tmp_path: Path, services):
    """stack(allow_fallback) starts a worker with an RDMA port and a store with TRANSPORT=rdma."""

    def make(allow_fallback: str) -> Stack:
        models, cache_dir = tmp_path / "models", tmp_path / "cache"
        models.mkdir()
        model_path = write_tiny_gguf(models / MODEL, seed=21)
        rdma_port = free_port()
        worker = services.worker(cache_dir=cache_dir, extra=["--rdma-port", str(rdma_port)])
        store = services.store(models, worker, policy="lru",
                               extra=["--transport", "rdma", "--allow-fallback", allow_fallback,
                                      "--worker-rdma-host", "127.0.0.1", "--worker-rdma-port", str(rdma_port)])
        return Stack(worker, store, cache_dir, model_path)

    return make


def ask(stack: Stack) -> requests.Response:
    return requests.post(stack.store.url + "/user_request", timeout=120,
                         json={"prompt": "hello", "model": MODEL, "max_tokens": 8})


def rdma_warnings(worker: ServiceProcess) -> list[str]:
    return [line for line in worker.log().splitlines() if "WARNING inference_worker.rdma_listener" in line]


def test_rdma_with_fallback_answers_over_http(stack) -> None:
    s = stack("1")
    response = ask(s)
    assert response.status_code == 200, response.text
    assert response.headers["X-Transport"] == "http(fallback)"
    assert response.headers["X-Cache-Action"] == "load_from_store"
    assert isinstance(response.text, str)
    worker_view = requests.get(s.worker.url + "/models", timeout=10).json()
    assert [m["name"] for m in worker_view["loaded"]] == [MODEL]
    assert [(m["name"], m["sha256"]) for m in worker_view["cached"]] == [(MODEL, sha256_file(s.model_path))]
    again = ask(s)
    assert again.status_code == 200 and again.headers["X-Cache-Action"] == "already_loaded"
    assert "rdma_unavailable" in s.store.log() and "falling back to http" in s.store.log()
    # The worker was given an RDMA port but has no RDMA: it started, said so once, and served HTTP.
    assert len(rdma_warnings(s.worker)) == 1


def test_rdma_without_fallback_is_502_and_leaves_nothing_on_the_worker(stack) -> None:
    s = stack("0")
    for _ in range(2):  # a failed send leaves the store consistent: the next request fails the same way
        response = ask(s)
        assert response.status_code == 502
        error = response.json()["error"]
        assert error["code"] == "rdma_unavailable"
        assert "pyverbs" in error["message"] or "RDMA device" in error["message"]
    prefetch = requests.post(s.store.url + "/admin/prefetch", json={"model": MODEL}, timeout=60)
    assert (prefetch.status_code, prefetch.json()["error"]["code"]) == (502, "rdma_unavailable")
    worker_view = requests.get(s.worker.url + "/models", timeout=10).json()
    assert worker_view["loaded"] == [] and worker_view["cached"] == []
    assert sorted(p.name for p in s.cache_dir.iterdir()) == []  # no model, no temporary file
    assert len(rdma_warnings(s.worker)) == 1
