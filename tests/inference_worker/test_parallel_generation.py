"""N_PARALLEL in the worker: the same text on one stream and on batched slots, the memory estimate,
and in-process registries with real llama.cpp (tiny models; the real ones for greedy parity)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from inference_worker.batch_prompt import BatchRequest
from inference_worker.memory import HOST_N_CTX, Budget, estimate_model_memory, kv_cache_bytes
from inference_worker.registry import LlamaSettings, ModelRegistry
from model_swap.errors import ApiError
from model_swap.gguf import read_header
from model_swap.model_settings import ModelSettings
from model_swap.web import GenerationRequest
from tests.support.gates import Gate

REAL = Path(__file__).resolve().parents[2] / "models"
SMOL, GEMMA = REAL / "SmolLM2-135M-Instruct.Q4_1.gguf", REAL / "gemma-3-270m-q4_k_m.gguf"
CHAT = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"})


def registry(n_parallel: int, n_ctx: int = 256, threads: int = 1, batch_invariant: bool = False,
             flash_attn: bool = False) -> ModelRegistry:
    return ModelRegistry(LlamaSettings(n_ctx, 0, threads, threads, n_parallel, batch_invariant, flash_attn),
                         Budget(1 << 40, "test"), max_loaded_models=3, drain_timeout_s=10.0)


def generate(reg: ModelRegistry, name: str, request: GenerationRequest) -> str:
    gen = reg.begin(name)
    try:
        if request.messages is not None:
            gen.check_messages(request.messages)
        else:
            gen.check_prompt(request.prompt)
        return "".join(gen.stream(request))
    finally:
        gen.release()


def texts(path: Path, n_parallel: int, requests: list[GenerationRequest], **kw) -> list[str]:
    """Every request at once from its own thread (so they share batches on a batched model)."""
    reg = registry(n_parallel, **kw)
    reg.load(path.name, path)
    out: list[str | BaseException] = [""] * len(requests)

    def one(i: int) -> None:
        try:
            out[i] = generate(reg, path.name, requests[i])
        except BaseException as err:  # reported below, not lost in the thread
            out[i] = err

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        reg.unload_all()
    assert not [o for o in out if isinstance(o, BaseException)], out
    return out


def greedy(prompt: str, max_tokens: int = 24) -> GenerationRequest:
    return GenerationRequest(prompt, None, max_tokens, 0.0)


def test_prompts_and_chats_give_the_same_text_on_one_stream_and_on_four_slots(make_model, tmp_path):
    tiny = make_model(tmp_path, "a.gguf", seed=1)
    requests = [greedy(f"prompt {i}: the quick brown fox", 32) for i in range(5)]
    requests += [GenerationRequest(None, CHAT, 32, 0.0), GenerationRequest(None, CHAT[1:], 32, 0.0, stop=("e",))]
    single = texts(tiny, 1, requests)
    assert all(single) and len(set(single)) > 1
    assert texts(tiny, 4, requests) == single


def test_a_batched_model_is_listed_with_its_slots_and_counts_their_kv_cache(make_model, tmp_path):
    tiny = make_model(tmp_path, "a.gguf", seed=1)
    header = read_header(tiny)
    reg = registry(4, n_ctx=512)
    try:
        reg.load("a.gguf", tiny)
        reg.load("b.gguf", make_model(tmp_path, "b.gguf", seed=2), ModelSettings(logprobs=True))
        listed = {m["name"]: m for m in reg.snapshot()}
    finally:
        reg.unload_all()
    # Four slots of 512 cells each, and the host Llama's smallest context.
    kv = 4 * kv_cache_bytes(header, 512) + kv_cache_bytes(header, HOST_N_CTX)
    assert listed["a.gguf"]["estimate"]["kv_cache_bytes"] == kv == estimate_model_memory(header, 512,
                                                                                          n_parallel=4).kv_cache
    assert (listed["a.gguf"]["n_parallel"], listed["a.gguf"]["slots"]) == (4, {"active": 0, "queued": 0})
    # A model loaded with logprobs keeps the single-stream engine (the batched sampler has none).
    assert listed["b.gguf"]["n_parallel"] == 1 and "slots" not in listed["b.gguf"]
    assert listed["b.gguf"]["estimate"]["kv_cache_bytes"] == kv_cache_bytes(header, 512)


def test_every_sampling_field_of_a_request_is_mapped():
    request = GenerationRequest("hi", None, 9, 0.5, top_p=0.8, seed=7, stop=("a", "b"), presence_penalty=0.4,
                                frequency_penalty=0.3)
    mapped = BatchRequest.from_generation(request)
    assert (mapped.prompt, mapped.max_tokens, mapped.stop) == ("hi", 9, ("a", "b"))
    assert mapped.sampling_kwargs() == {"temperature": 0.5, "top_p": 0.8, "seed": 7, "presence_penalty": 0.4,
                                        "frequency_penalty": 0.3}
    chat = BatchRequest.from_generation(GenerationRequest(None, CHAT, 9, None, stop=("b", "c")), [1, 2, 3],
                                        chat_stop=("<|im_end|>", "b"))
    assert (chat.prompt, chat.messages, chat.stop) == ((1, 2, 3), None, ("<|im_end|>", "b", "c"))


def test_sampling_fields_reach_the_slot_as_on_one_stream(make_model, tmp_path):
    """Seeded sampling with every field /infer takes gives the single-stream engine's text."""
    tiny = make_model(tmp_path, "a.gguf", seed=3)
    request = GenerationRequest("once upon a time", None, 24, 0.9, top_p=0.8, seed=7, stop=("zz",),
                                presence_penalty=0.4, frequency_penalty=0.3)
    other = GenerationRequest("once upon a time", None, 24, 0.9, top_p=0.8, seed=8, stop=("zz",),
                              presence_penalty=0.4, frequency_penalty=0.3)
    single = texts(tiny, 1, [request, other])
    assert single[0] != single[1]  # the seed matters, so equal texts below are not luck
    assert texts(tiny, 4, [request, other]) == single


# Greedy text must not change with N_PARALLEL. SmolLM2 holds with the defaults and with
# FLASH_ATTN. Gemma's Q4_K weights are repacked for this CPU and those kernels round differently
# for different batch sizes, so it holds there only with BATCH_INVARIANT (docs/architecture.md,
# "Batched decoding").
SMOL_REQUESTS = [greedy("Once upon a time"), greedy("The capital of France is"),
                 GenerationRequest(None, CHAT[1:], 24, 0.0)]


@pytest.mark.slow
@pytest.mark.parametrize("path,options,requests", [
    (SMOL, {}, SMOL_REQUESTS),
    (SMOL, {"flash_attn": True}, SMOL_REQUESTS),
    (GEMMA, {"batch_invariant": True},
     [greedy("Once upon a time"), greedy("The capital of France is"), greedy("List three colors:")]),
], ids=["smollm2", "smollm2-flash-attn", "gemma-batch-invariant"])
def test_greedy_text_of_the_real_models_is_the_same_for_one_and_four_slots(path, options, requests):
    if not path.is_file():
        pytest.skip("the real models are not in models/ (./scripts/test.sh fetches them)")
    single = texts(path, 1, requests, n_ctx=512, **options)
    assert all(single)
    assert texts(path, 4, requests, n_ctx=512, **options) == single


def _eventually(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_unload_waits_for_the_active_slots_and_refuses_new_requests(make_model, tmp_path):
    reg = registry(4)
    try:
        reg.load("a.gguf", make_model(tmp_path, "a.gguf", seed=1))
        running = reg.begin("a.gguf")
        pieces = running.stream(greedy("hello", 200))
        assert next(pieces)
        done: list[bool] = []
        unloader = threading.Thread(target=lambda: done.append(reg.unload("a.gguf")))
        unloader.start()
        _eventually(lambda: reg.snapshot()[0]["unloading"])
        with pytest.raises(ApiError) as err:
            reg.begin("a.gguf")
        assert (err.value.status, err.value.code) == (409, "model_unloading")
        assert "".join(pieces), "the running stream goes on while the unload waits"
        assert unloader.is_alive() and reg.loaded_names() == ["a.gguf"]
        running.release()
        unloader.join(timeout=10)
        assert done == [True] and reg.loaded_names() == []
    finally:
        reg.unload_all()


def test_drain_timeout_is_model_busy_and_a_disconnect_frees_the_slot(make_model, tmp_path):
    """The gate holds the decode loop after the prompt's step, so the stream is still generating
    when the unload times out and when it is released, however fast the machine."""
    gate = Gate()
    reg = ModelRegistry(LlamaSettings(2048, 0, 1, 1, 2), Budget(1 << 40, "test"), 3, drain_timeout_s=0.2,
                        on_step=gate)
    try:
        reg.load("a.gguf", make_model(tmp_path, "a.gguf", seed=1))
        running = reg.begin("a.gguf")
        pieces = running.stream(greedy("hello", 10_000))  # room for about 2000 tokens
        _eventually(lambda: gate.steps == 1)  # the prompt and the first token; the loop waits at the gate
        with pytest.raises(ApiError) as err:
            reg.unload("a.gguf")
        assert (err.value.status, err.value.code) == (409, "model_busy")
        running.release()  # what the route does when the client goes away
        gate.open()
        _eventually(lambda: reg.snapshot()[0]["slots"] == {"active": 0, "queued": 0})
        batched = reg._models["a.gguf"].batched
        # The closed slot is freed before the loop's next step: no token after the one it had.
        assert batched.stats().tokens_generated == 1, "the slot was freed before its stream could go on"
        assert len(list(pieces)) <= 1 and running.finish_reason == "cancelled"
        assert generate(reg, "a.gguf", greedy("hello", 4)), "after a timed-out unload the model serves again"
        assert reg.unload("a.gguf")
    finally:
        gate.open()
        reg.unload_all()
