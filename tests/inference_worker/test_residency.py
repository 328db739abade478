"""Several models resident in one real worker: the count, the budget, drains, and the estimate
against what each load really took."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from inference_worker.memory import estimate_model_memory
from model_swap.gguf import read_header

REAL = Path(__file__).resolve().parents[2] / "models"
SMOL, GEMMA = "SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"
needs_real_models = pytest.mark.skipif(not (REAL / SMOL).is_file() or not (REAL / GEMMA).is_file(),
                                       reason="the real models are not in models/ (./scripts/test.sh fetches them)")
pytestmark = pytest.mark.slow


def cache(worker, path: Path, name: str | None = None) -> None:
    with open(path, "rb") as f:
        r = requests.post(worker.url + "/cache_model", data=f, headers={"X-Model-Name": name or path.name}, timeout=60)
    assert r.status_code == 200, r.text


def load(worker, name: str) -> requests.Response:
    return requests.post(worker.url + "/load_model_from_local_store", headers={"X-Model-Name": name}, timeout=60)


def infer(worker, model: str | None, prompt: str = "hello", max_tokens: int = 12) -> requests.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if model is not None:
        body["model"] = model
    return requests.post(worker.url + "/infer", json=body, timeout=60)


def listing(worker) -> dict:
    return requests.get(worker.url + "/models", timeout=10).json()


def loaded(worker) -> list[str]:
    return [m["name"] for m in listing(worker)["loaded"]]


def error_of(r: requests.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


def test_two_resident_models_serve_at_once_and_a_third_needs_room(services, make_model, tmp_path):
    worker = services.worker(extra=["--max-loaded-models", "2", "--n-ctx", "512"])
    names = ["t1.gguf", "t2.gguf", "t3.gguf"]
    for seed, name in enumerate(names, start=11):
        cache(worker, make_model(tmp_path / "src", name, seed=seed))
    assert load(worker, "t1.gguf").status_code == 200 and load(worker, "t2.gguf").status_code == 200
    alone = {n: infer(worker, n).text for n in names[:2]}
    assert alone["t1.gguf"] != alone["t2.gguf"], "different weights give different greedy text"

    results: list[tuple[str, int, str, str]] = []
    start = threading.Barrier(4)

    def stream(name: str) -> None:
        start.wait()
        r = infer(worker, name)
        results.append((name, r.status_code, r.text, r.headers.get("X-Model-Name")))

    threads = [threading.Thread(target=stream, args=(n,)) for n in names[:2] * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == sorted((n, 200, alone[n], n) for n in names[:2] * 2)

    refused = load(worker, "t3.gguf")
    assert error_of(refused) == (507, "insufficient_memory")
    details = refused.json()["error"]
    assert [m["name"] for m in details["resident"]] == names[:2] and details["max_loaded_models"] == 2
    assert details["need_bytes"] > 0 and details["free_bytes"] >= 0
    assert {n: infer(worker, n).text for n in names[:2]} == alone, "a refused load changes nothing"

    assert requests.post(worker.url + "/unload", json={"model": "t1.gguf"}).json() == {"unloaded": ["t1.gguf"]}
    assert load(worker, "t3.gguf").status_code == 200
    assert infer(worker, "t3.gguf").status_code == 200
    assert error_of(infer(worker, "t1.gguf")) == (409, "model_not_loaded")
    assert error_of(infer(worker, None)) == (400, "model_required")
    assert loaded(worker) == ["t2.gguf", "t3.gguf"]


def test_budget_that_fits_one_model_refuses_the_second(services, make_model, tmp_path):
    a, b = make_model(tmp_path / "src", "a.gguf", seed=21), make_model(tmp_path / "src", "b.gguf", seed=22)
    need = estimate_model_memory(read_header(a), 512, n_parallel=4).total  # four slots of 512 cells each
    budget = int(need * 1.5)
    worker = services.worker(extra=["--memory-budget-bytes", str(budget), "--n-ctx", "512", "--n-parallel", "4"])
    cache(worker, a)
    cache(worker, b)
    assert load(worker, "a.gguf").status_code == 200
    refused = load(worker, "b.gguf")
    assert error_of(refused) == (507, "insufficient_memory")
    assert refused.json()["error"]["need_bytes"] == need and refused.json()["error"]["free_bytes"] < need
    assert infer(worker, "a.gguf").status_code == 200
    state = listing(worker)
    entry = state["loaded"][0]
    assert state["memory"]["budget_bytes"] == budget
    assert state["memory"]["used_bytes"] == max(entry["memory_bytes"], entry["estimated_bytes"])
    assert 'worker_model_loads_total{result="insufficient_memory"} 1.0' in requests.get(worker.url + "/metrics").text


@needs_real_models
def test_unload_waits_for_a_long_generation_while_the_other_model_serves(services, make_model, tmp_path):
    """The long generation is a response nobody reads (16000 tokens, ~300 KB of ndjson, twice what
    the worker's capped send buffer and a 4 KiB receive buffer can hold): it holds tiny's model
    until the client leaves, so everything below happens during it on any machine. The client then
    hangs up rather than reading it back through that buffer (~20 s for 190 KB here). That a
    draining unload lets the generation run to its end is held in-process, without the long decode:
    test_parallel_generation.py::test_unload_waits_for_the_active_slots_and_refuses_new_requests.
    """
    worker = services.worker(extra=["--n-ctx", "16384"])
    cache(worker, REAL / SMOL)
    cache(worker, make_model(tmp_path / "src", "tiny.gguf", seed=31))
    assert load(worker, SMOL).status_code == 200 and load(worker, "tiny.gguf").status_code == 200

    host, port = worker.url.removeprefix("http://").split(":")
    conn = socket.socket()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read past the status line
    conn.connect((host, int(port)))
    body = json.dumps({"prompt": "hi", "max_tokens": 16000, "temperature": 0, "model": "tiny.gguf",
                       "stream_format": "ndjson"})
    conn.sendall(f"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    conn.settimeout(30)
    assert conn.recv(64).startswith(b"HTTP/1.1 200")
    unload: list[requests.Response] = []
    unloader = threading.Thread(target=lambda: unload.append(
        requests.post(worker.url + "/unload", json={"model": "tiny.gguf"}, timeout=120)))
    unloader.start()
    deadline = time.monotonic() + 30
    while True:
        entry = {m["name"]: m for m in listing(worker)["loaded"]}.get("tiny.gguf")
        assert entry is not None, "the unload did not wait for the running generation"
        if entry["unloading"]:
            break
        assert time.monotonic() < deadline
        time.sleep(0.01)

    assert error_of(infer(worker, "tiny.gguf")) == (409, "model_unloading")
    assert infer(worker, SMOL).status_code == 200, "the other model serves during the generation"
    assert unloader.is_alive(), "the unload waits for the running generation"
    assert loaded(worker) == [SMOL, "tiny.gguf"]

    conn.close()  # the generation ends (the worker sees the client leave); now the unload goes on
    unloader.join(timeout=120)
    response, = unload
    assert response.status_code == 200 and response.json() == {"unloaded": ["tiny.gguf"]}
    assert loaded(worker) == [SMOL]


@needs_real_models
def test_estimate_is_within_25_percent_of_what_each_load_took(services, make_model, tmp_path):
    worker = services.worker()
    models = [REAL / SMOL, REAL / GEMMA, make_model(tmp_path / "src", "tiny8.gguf", seed=41, size_mb=8),
              make_model(tmp_path / "src", "tiny32.gguf", seed=42, size_mb=32)]
    for path in models:
        cache(worker, path)
    # A load's RSS change moves by a few MB with what the server's other threads free meanwhile,
    # and the first load after start also pays llama.cpp's one-time set-up (about 4 MB): the
    # measured need is the median of three loads.
    measured: dict[str, list[int]] = {p.name: [] for p in models}
    estimated: dict[str, int] = {}
    for _ in range(3):
        for path in models:
            assert load(worker, path.name).status_code == 200
            entry = next(e for e in listing(worker)["loaded"] if e["name"] == path.name)
            assert entry["llama_model_bytes"] == entry["estimate"]["weights_bytes"]
            measured[path.name].append(entry["memory_bytes"])
            estimated[path.name] = entry["estimated_bytes"]
            assert requests.post(worker.url + "/unload", json={"model": path.name}).ok
    for name, samples in measured.items():
        need = sorted(samples)[1]
        assert abs(estimated[name] - need) <= 0.25 * need, (name, estimated[name], samples)
