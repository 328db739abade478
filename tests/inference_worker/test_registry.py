"""The registry of resident models with real llama.cpp and tiny models: side by side, per-model
turns, the count and the budget, drains, failed loads."""

from __future__ import annotations

import threading
import time

import pytest

from inference_worker.engine import FairLock
from inference_worker.memory import Budget, estimate_model_memory
from inference_worker.registry import LlamaSettings, ModelRegistry
from inference_worker.testing.tiny_gguf import write_unloadable_gguf
from model_swap.errors import ApiError
from model_swap.gguf import read_header
from model_swap.web import GenerationRequest

N_CTX = 256
SETTINGS = LlamaSettings(n_ctx=N_CTX, n_gpu_layers=0, n_threads=1, n_threads_batch=1)
GREEDY = GenerationRequest("hello", None, 6, 0.0)


@pytest.fixture
def models(make_model, tmp_path):
    return {n: make_model(tmp_path, n, seed=i + 1) for i, n in enumerate(["a.gguf", "b.gguf", "c.gguf"])}


def _registry(budget: int = 1 << 40, max_loaded: int = 3, drain_s: float = 10.0) -> ModelRegistry:
    return ModelRegistry(SETTINGS, Budget(budget, "test"), max_loaded, drain_s)


@pytest.fixture
def registry():
    r = _registry()
    yield r
    r.unload_all()


def _text(registry: ModelRegistry, model: str | None) -> str:
    gen = registry.begin(model)
    try:
        return "".join(gen.stream(GREEDY))
    finally:
        gen.release()


def _eventually(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_models_load_side_by_side_and_each_serves_its_own_text(registry, models):
    registry.load("a.gguf", models["a.gguf"])
    alone = _text(registry, "a.gguf")
    registry.load("b.gguf", models["b.gguf"])
    assert registry.loaded_names() == ["a.gguf", "b.gguf"]
    assert _text(registry, "a.gguf") == alone, "loading b must not disturb a"
    assert _text(registry, "b.gguf") != alone


def test_generations_of_different_models_do_not_wait_for_each_other(registry, models):
    registry.load("a.gguf", models["a.gguf"])
    registry.load("b.gguf", models["b.gguf"])
    held = registry.begin("a.gguf")  # a's turn is taken
    try:
        started = []
        t = threading.Thread(target=lambda: started.append(_text(registry, "b.gguf")))
        t.start()
        t.join(timeout=10)
        assert started, "b must generate while a generation holds a's turn"
        waiter = threading.Thread(target=lambda: started.append(_text(registry, "a.gguf")))
        waiter.start()
        _eventually(lambda: registry.snapshot()[0]["waiting"] == 1)
        assert waiter.is_alive(), "a second generation of a waits for a's turn"
    finally:
        held.release()
    waiter.join(timeout=10)
    assert len(started) == 2


def test_omitted_model_only_when_exactly_one_is_loaded(registry, models):
    with pytest.raises(ApiError) as err:
        registry.begin(None)
    assert err.value.code == "model_not_loaded"
    registry.load("a.gguf", models["a.gguf"])
    registry.begin(None).release()
    registry.load("b.gguf", models["b.gguf"])
    with pytest.raises(ApiError) as err:
        registry.begin(None)
    assert (err.value.status, err.value.code) == (400, "model_required")
    with pytest.raises(ApiError) as err:
        registry.begin("c.gguf")
    assert err.value.code == "model_not_loaded"
    assert registry.queue_depth() == 0  # refused requests hold nothing


def test_count_limit_is_507_and_changes_nothing(models):
    registry = _registry(max_loaded=2)
    try:
        registry.load("a.gguf", models["a.gguf"])
        registry.load("b.gguf", models["b.gguf"])
        with pytest.raises(ApiError) as err:
            registry.load("c.gguf", models["c.gguf"])
        assert (err.value.status, err.value.code) == (507, "insufficient_memory")
        assert [r["name"] for r in err.value.details["resident"]] == ["a.gguf", "b.gguf"]
        assert err.value.details["max_loaded_models"] == 2
        assert registry.loaded_names() == ["a.gguf", "b.gguf"]
        assert registry.unload("a.gguf")
        registry.load("c.gguf", models["c.gguf"])
        assert _text(registry, "c.gguf")
    finally:
        registry.unload_all()


def test_budget_for_one_model_refuses_the_second(models):
    need = estimate_model_memory(read_header(models["a.gguf"]), N_CTX).total
    registry = _registry(budget=int(need * 1.5))
    try:
        registry.load("a.gguf", models["a.gguf"])
        with pytest.raises(ApiError) as err:
            registry.load("b.gguf", models["b.gguf"])
        assert err.value.code == "insufficient_memory"
        details = err.value.details
        assert details["need_bytes"] == need and details["free_bytes"] < need
        assert details["budget_bytes"] == int(need * 1.5)
        assert _text(registry, "a.gguf")
    finally:
        registry.unload_all()


def test_unload_drains_refuses_newcomers_and_leaves_others_serving(registry, models):
    registry.load("a.gguf", models["a.gguf"])
    registry.load("b.gguf", models["b.gguf"])
    running = registry.begin("a.gguf")
    results: list = []
    unloader = threading.Thread(target=lambda: results.append(registry.unload("a.gguf")))
    unloader.start()
    _eventually(lambda: registry.snapshot()[0]["unloading"])
    with pytest.raises(ApiError) as err:
        registry.begin("a.gguf")
    assert (err.value.status, err.value.code) == (409, "model_unloading")
    assert _text(registry, "b.gguf"), "the other model serves on"
    assert "".join(running.stream(GREEDY)), "the running generation still works while the unload waits"
    assert unloader.is_alive() and registry.loaded_names() == ["a.gguf", "b.gguf"]
    running.release()
    unloader.join(timeout=10)
    assert results == [True] and registry.loaded_names() == ["b.gguf"]


def test_drain_timeout_is_model_busy_and_unloads_nothing(models):
    registry = _registry(drain_s=0.2)
    try:
        registry.load("a.gguf", models["a.gguf"])
        running = registry.begin("a.gguf")
        with pytest.raises(ApiError) as err:
            registry.unload("a.gguf")
        assert (err.value.status, err.value.code) == (409, "model_busy")
        running.release()
        assert registry.loaded_names() == ["a.gguf"]
        assert _text(registry, "a.gguf"), "after a timed-out unload the model takes generations again"
    finally:
        registry.unload_all()


@pytest.mark.parametrize("kind", ["truncated", "refused_by_llama_cpp"])
def test_failed_load_leaves_resident_models_serving(registry, models, tmp_path, kind):
    registry.load("a.gguf", models["a.gguf"])
    before = _text(registry, "a.gguf")
    bad = tmp_path / "bad.gguf"
    if kind == "truncated":
        bad.write_bytes(models["b.gguf"].read_bytes()[:-1000])
    else:
        write_unloadable_gguf(bad)
    with pytest.raises(ApiError) as err:
        registry.load("bad.gguf", bad)
    assert (err.value.status, err.value.code) == (422, "load_failed")
    assert registry.loaded_names() == ["a.gguf"]
    assert _text(registry, "a.gguf") == before


def test_reloading_the_same_file_is_a_no_op_and_records_use(registry, models):
    first = registry.load("a.gguf", models["a.gguf"])
    again = registry.load("a.gguf", models["a.gguf"])
    assert not first.already_loaded and again.already_loaded
    entry = registry.snapshot()[0]
    assert entry["memory_bytes"] == first.memory_bytes and entry["estimated_bytes"] == first.estimated_bytes
    assert entry["last_used"] >= entry["loaded_at"]


def test_release_is_idempotent(registry, models):
    registry.load("a.gguf", models["a.gguf"])
    gen = registry.begin(None)
    gen.release()
    gen.release()
    assert registry.queue_depth() == 0


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


def test_thread_counts_reach_llama_cpp(models):
    import llama_cpp

    # The reverse of llama-cpp-python's own defaults on two cores (half the cores; all for batches).
    registry = ModelRegistry(LlamaSettings(N_CTX, 0, n_threads=2, n_threads_batch=1), Budget(1 << 40, "test"), 3, 1.0)
    try:
        registry.load("a.gguf", models["a.gguf"])
        gen = registry.begin("a.gguf")
        ctx = gen._llm.ctx
        assert (llama_cpp.llama_n_threads(ctx), llama_cpp.llama_n_threads_batch(ctx)) == (2, 1)
        gen.release()
    finally:
        registry.unload_all()
