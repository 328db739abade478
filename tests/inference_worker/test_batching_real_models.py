"""Batched decoding on the two real models gives the text of llama-cpp-python's high-level path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from llama_cpp import Llama

from inference_worker.batch_prompt import BatchRequest, kv_cache_bytes
from inference_worker.batching import BatchedModel

MODELS = Path(__file__).resolve().parents[2] / "models"
SMOL = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = MODELS / "gemma-3-270m-q4_k_m.gguf"
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "List three colors:"]
TOKENS = 24
N_CTX = 512
# One thread: on a busy 2-core machine, llama.cpp threads that spin-wait for each other slow down
# by an order of magnitude (the results do not depend on the thread count).
THREADS = 1

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not SMOL.is_file() or not GEMMA.is_file(), reason="the real models are not in models/ (./scripts/test.sh fetches them)")]


def batched_texts(path: Path, n_parallel: int, requests: list[BatchRequest], **kw) -> list[str]:
    """Submit all requests at once (so they share batches) and return their texts."""
    with BatchedModel(path, n_ctx_per_slot=N_CTX, n_parallel=n_parallel, n_threads=THREADS, **kw) as bm:
        streams = [bm.submit(r) for r in requests]
        return [s.text() for s in streams]


def high_level(path: Path, call, flash_attn: bool = True) -> str:
    """What a fresh Llama (today's engine path, no prefix reused from an earlier request) produces."""
    llm = Llama(str(path), n_ctx=N_CTX, n_threads=THREADS, n_threads_batch=THREADS, flash_attn=flash_attn, verbose=False)
    try:
        return "".join(call(llm))
    finally:
        llm.close()


def completion_text(chunks) -> list[str]:
    return [c["choices"][0]["text"] for c in chunks]


def chat_text(chunks) -> list[str]:
    return [c["choices"][0]["delta"].get("content") or "" for c in chunks]


def greedy(prompt: str) -> BatchRequest:
    return BatchRequest(prompt=prompt, max_tokens=TOKENS, temperature=0)


# Gemma's Q4_K weights are repacked for this CPU by default, and those kernels (and flash
# attention) round differently for different batch sizes (see docs/architecture.md), so its
# 1-vs-4 comparison runs batch_invariant.
@pytest.mark.parametrize("path,options", [(SMOL, {}), (GEMMA, {"batch_invariant": True})], ids=["smollm2", "gemma"])
def test_greedy_text_is_the_same_for_one_and_four_slots(path, options):
    requests = [greedy(p) for p in PROMPTS]
    assert batched_texts(path, 4, requests, **options) == batched_texts(path, 1, requests, **options)


@pytest.mark.parametrize("flash_attn", [True, False], ids=["flash", "no-flash"])
@pytest.mark.parametrize("path", [SMOL, GEMMA], ids=["smollm2", "gemma"])
def test_one_slot_gives_the_high_level_greedy_completion(path, flash_attn):
    prompts = PROMPTS[:2]
    got = batched_texts(path, 1, [greedy(p) for p in prompts], flash_attn=flash_attn)
    want = [high_level(path, lambda llm, p=p: completion_text(
        llm.create_completion(p, max_tokens=TOKENS, temperature=0, stream=True)), flash_attn) for p in prompts]
    assert got == want


def test_seeded_sampling_gives_the_high_level_text():
    request = BatchRequest(prompt=PROMPTS[1], max_tokens=TOKENS, temperature=0.9, top_k=50, top_p=0.9, min_p=0.02,
                           repeat_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.2, seed=7)
    want = high_level(SMOL, lambda llm: completion_text(llm.create_completion(
        PROMPTS[1], max_tokens=TOKENS, temperature=0.9, top_k=50, top_p=0.9, min_p=0.02, repeat_penalty=1.2,
        presence_penalty=0.3, frequency_penalty=0.2, seed=7, stream=True)))
    assert batched_texts(SMOL, 4, [request, greedy(PROMPTS[0])])[0] == want


def test_chat_uses_the_high_level_template_and_stops():
    messages = ({"role": "system", "content": "Answer in one short sentence."},
                {"role": "user", "content": "What is the capital of France?"})
    want = high_level(SMOL, lambda llm: chat_text(llm.create_chat_completion(
        list(messages), max_tokens=64, temperature=0, stream=True)))
    got = batched_texts(SMOL, 4, [BatchRequest(messages=messages, max_tokens=64, temperature=0),
                                  greedy(PROMPTS[0])])
    assert got[0] == want and "<|im_end|>" not in got[0]


@pytest.mark.parametrize("path", [SMOL, GEMMA], ids=["smollm2", "gemma"])
def test_kv_cache_bytes_is_what_llama_cpp_allocates(path, capfd):
    n_ctx = 1024
    llm = Llama(str(path), n_ctx=n_ctx, n_threads=1, verbose=True)
    try:
        metadata = dict(llm.metadata)
    finally:
        llm.close()
    logged = capfd.readouterr().err
    mib = sum(float(m) for m in re.findall(r"llama_kv_cache: size = +([0-9.]+) MiB", logged))
    assert mib > 0
    assert kv_cache_bytes(metadata, n_ctx) == pytest.approx(mib * (1 << 20), abs=0.01 * (1 << 20))
