"""The engine with real llama.cpp and tiny models: drain, fairness, failed loads."""

from __future__ import annotations

import threading
import time

import pytest

from inference_worker.engine import Engine, FairLock
from model_swap.errors import ApiError
from model_swap.web import GenerationRequest


@pytest.fixture
def models(make_model, tmp_path):
    return make_model(tmp_path, "a.gguf", seed=1), make_model(tmp_path, "b.gguf", seed=2)


@pytest.fixture
def engine():
    e = Engine(n_ctx=256, n_gpu_layers=0)
    yield e
    e.unload()


def test_load_waits_for_generation_to_release(engine, models):
    a, b = models
    engine.load("a.gguf", a)
    gen = engine.begin("a.gguf")
    loader = threading.Thread(target=engine.load, args=("b.gguf", b))
    loader.start()
    loader.join(timeout=0.3)
    assert loader.is_alive(), "load must wait while a generation holds the model"
    assert engine.loaded == "a.gguf"
    assert "".join(gen.stream(GenerationRequest("hi", None, 3, 0.0)))
    gen.release()
    loader.join(timeout=30)
    assert engine.loaded == "b.gguf"


def test_begin_refuses_another_model(engine, models):
    a, _ = models
    with pytest.raises(ApiError) as err:
        engine.begin(None)
    assert err.value.code == "model_not_loaded"
    engine.load("a.gguf", a)
    with pytest.raises(ApiError) as err:
        engine.begin("b.gguf")
    assert err.value.code == "model_not_loaded"
    engine.begin("a.gguf").release()  # the refused turns were given back


def test_failed_load_restores_previous(engine, models, tmp_path):
    a, _ = models
    engine.load("a.gguf", a)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(a.read_bytes()[:1000])
    with pytest.raises(ApiError) as err:
        engine.load("broken.gguf", broken)
    assert err.value.code == "load_failed"
    assert engine.loaded == "a.gguf"
    gen = engine.begin("a.gguf")
    assert "".join(gen.stream(GenerationRequest("hi", None, 2, 0.0)))
    gen.release()


def test_release_is_idempotent(engine, models):
    engine.load("a.gguf", models[0])
    gen = engine.begin(None)
    gen.release()
    gen.release()
    assert engine.queue_depth() == 0


def test_fair_lock_grants_in_arrival_order():
    lock = FairLock()
    order: list[int] = []
    lock.acquire()
    threads = []
    for i in range(5):
        t = threading.Thread(target=lambda i=i: (lock.acquire(), order.append(i), lock.release()))
        t.start()
        threads.append(t)
        while lock.waiting() < i + 2:  # wait until thread i holds its ticket
            time.sleep(0.001)
    lock.release()
    for t in threads:
        t.join(timeout=5)
    assert order == [0, 1, 2, 3, 4]
