"""Chat templates, per-model load settings and output options, with real llama.cpp and tiny models."""

from __future__ import annotations

import json

import pytest

from inference_worker.chat_templates import choose_chat_template
from inference_worker.engine import open_llama
from inference_worker.memory import Budget, estimate_model_memory
from inference_worker.registry import LlamaSettings, ModelRegistry
from model_swap.errors import ApiError
from model_swap.gguf import read_header
from model_swap.model_settings import ModelSettings
from model_swap.web import GenerationRequest

CHAT = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"})
N_CTX = 256


def _registry(budget: int = 1 << 40, n_parallel: int = 1) -> ModelRegistry:
    return ModelRegistry(LlamaSettings(n_ctx=N_CTX, n_gpu_layers=0, n_threads=1, n_threads_batch=1,
                                       n_parallel=n_parallel),
                         Budget(budget, "test"), max_loaded_models=3, drain_timeout_s=10.0)


@pytest.fixture
def tiny(make_model, tmp_path):
    return make_model(tmp_path, "a.gguf", seed=1)


# Every feature holds on both engines: the single-stream one (N_PARALLEL=1) and batched slots.
@pytest.fixture(params=[1, 4], ids=["single-stream", "four-slots"])
def engine(request):
    registry = _registry(n_parallel=request.param)
    yield registry
    registry.unload_all()


def _chat(engine: ModelRegistry, name: str, request: GenerationRequest) -> tuple[list, object]:
    gen = engine.begin(name)
    try:
        gen.check_messages(request.messages)
        return list(gen.stream(request)), gen
    finally:
        gen.release()


def test_a_file_without_template_gets_the_plain_fallback(tiny):
    llm = open_llama(tiny, N_CTX, 0, 1, 1)
    try:
        template = choose_chat_template(llm, None)
        assert template.label == "fallback:plain"
        assert template.formatter(messages=list(CHAT)).prompt == "Be brief.\n\nUser: Hi\nAssistant:"
        assert "\nUser:" in template.stop  # the model's next "User:" line ends its answer
        assert choose_chat_template(llm, "chatml").label == "config:chatml"
        custom = choose_chat_template(llm, "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
        assert custom.label == "config:custom"
        assert custom.formatter(messages=list(CHAT)).prompt == "<system>Be brief.<user>Hi"
        with pytest.raises(ValueError, match="no tokenizer.chat_template"):
            choose_chat_template(llm, "gguf")
    finally:
        llm.close()


def test_a_file_with_a_template_uses_its_own(real_model):
    llm = open_llama(real_model("SmolLM2-135M-Instruct.Q4_1.gguf"), N_CTX, 0, 1, 1)
    try:
        template = choose_chat_template(llm, None)
        assert template.label == "gguf"
        assert "<|im_start|>user\nHi<|im_end|>" in template.formatter(messages=list(CHAT)).prompt
    finally:
        llm.close()


def test_chat_counts_its_prompt_and_refuses_what_does_not_fit(engine, tiny):
    engine.load("a.gguf", tiny, ModelSettings(n_ctx=32))
    pieces, gen = _chat(engine, "a.gguf", GenerationRequest(None, CHAT, 4, 0.0))
    assert pieces and gen.prompt_tokens >= len("Be brief.\n\nUser: Hi\nAssistant:") // 4
    gen = engine.begin("a.gguf")
    try:
        with pytest.raises(ApiError) as err:  # the byte-level tiny vocab: about one token per character
            gen.check_messages(({"role": "user", "content": "x" * 200},))
        assert err.value.code == "prompt_too_long"
    finally:
        gen.release()


def test_settings_are_applied_at_load_and_a_change_reloads(engine, tiny):
    def context_and_template() -> tuple[int, str]:
        gen = engine.begin("a.gguf")
        try:
            return gen._n_ctx, gen.chat.label
        finally:
            gen.release()

    engine.load("a.gguf", tiny)
    assert context_and_template() == (256, "fallback:plain")
    assert engine.load("a.gguf", tiny).load_ms == 0.0  # same file, same settings: nothing to do
    assert engine.load("a.gguf", tiny, ModelSettings(n_ctx=64, chat_template="chatml")).load_ms > 0
    assert context_and_template() == (64, "config:chatml")


def test_a_template_that_cannot_apply_fails_the_load_and_keeps_the_previous(engine, tiny, make_model, tmp_path):
    engine.load("a.gguf", tiny)
    other = make_model(tmp_path, "b.gguf", seed=2)
    with pytest.raises(ApiError) as err:
        engine.load("b.gguf", other, ModelSettings(chat_template="gguf"))
    assert err.value.code == "load_failed"
    assert engine.loaded_names() == ["a.gguf"]


def test_logprobs_need_the_setting(engine, tiny):
    engine.load("a.gguf", tiny)
    gen = engine.begin("a.gguf")
    try:
        with pytest.raises(ApiError) as err:
            list(gen.stream(GenerationRequest("hello", None, 3, 0.0, logprobs=2)))
        assert (err.value.code, err.value.param) == ("invalid_request", "logprobs")
    finally:
        gen.release()
    engine.load("a.gguf", tiny, ModelSettings(logprobs=True))
    gen = engine.begin("a.gguf")
    try:
        pieces = list(gen.stream(GenerationRequest("hello", None, 3, 0.0, logprobs=2)))
    finally:
        gen.release()
    tokens = [lp for p in pieces for lp in p.logprobs]
    assert "".join(t["token"] for t in tokens) == "".join(pieces)
    for token in tokens:
        assert token["logprob"] <= 0 and 1 <= len(token["top_logprobs"]) <= 2
        assert token["top_logprobs"] == sorted(token["top_logprobs"], key=lambda t: -t["logprob"])


@pytest.mark.parametrize("response_format", [
    {"type": "json_object"},
    {"type": "json_schema", "schema": {"type": "object", "properties": {"answer": {"type": "integer"}},
                                       "required": ["answer"]}},
])
def test_json_output_through_a_grammar(engine, tiny, response_format):
    engine.load("a.gguf", tiny)
    gen = engine.begin("a.gguf")
    try:
        text = "".join(gen.stream(GenerationRequest("hello", None, 64, 0.0, response_format=response_format)))
    finally:
        gen.release()
    assert gen.finish_reason == "stop"
    value = json.loads(text)  # a random-weight model writes valid JSON only because the grammar makes it
    assert isinstance(value, dict)
    if response_format["type"] == "json_schema":
        assert isinstance(value["answer"], int)


def _context_and_template(registry: ModelRegistry, name: str) -> tuple[int, str]:
    gen = registry.begin(name)
    try:
        return gen._n_ctx, gen.chat.label
    finally:
        gen.release()


def test_resident_models_keep_their_own_settings(engine, tiny, make_model, tmp_path):
    engine.load("a.gguf", tiny, ModelSettings(n_ctx=64, chat_template="chatml", logprobs=True))
    engine.load("b.gguf", make_model(tmp_path, "b.gguf", seed=2))
    assert engine.loaded_names() == ["a.gguf", "b.gguf"]
    assert _context_and_template(engine, "a.gguf") == (64, "config:chatml")
    assert _context_and_template(engine, "b.gguf") == (N_CTX, "fallback:plain")
    listed = {m["name"]: m for m in engine.snapshot()}
    assert (listed["a.gguf"]["n_ctx"], listed["a.gguf"]["chat_template"]) == (64, "config:chatml")
    assert listed["a.gguf"]["settings"] == {"n_ctx": 64, "chat_template": "chatml", "logprobs": True}
    assert (listed["b.gguf"]["n_ctx"], listed["b.gguf"]["settings"]) == (N_CTX, {})
    # a's logits table (its own 64 positions) counts against the budget; b keeps none.
    logits = estimate_model_memory(read_header(tiny), 64, logits_all=True).logits
    assert listed["a.gguf"]["estimate"]["logits_bytes"] == logits > 0
    assert listed["b.gguf"]["estimate"]["logits_bytes"] == 0
    for name, allowed in (("a.gguf", True), ("b.gguf", False)):  # logits are kept for a only
        gen = engine.begin(name)
        try:
            if allowed:
                assert all(p.logprobs for p in gen.stream(GenerationRequest("hello", None, 2, 0.0, logprobs=1)))
            else:
                with pytest.raises(ApiError) as err:
                    list(gen.stream(GenerationRequest("hello", None, 2, 0.0, logprobs=1)))
                assert err.value.param == "logprobs"
        finally:
            gen.release()


def test_the_estimate_and_the_budget_use_the_models_own_context(tiny):
    header = read_header(tiny)
    default, large = estimate_model_memory(header, N_CTX).total, estimate_model_memory(header, 4 * N_CTX).total
    assert large > default  # a larger context needs a larger KV cache
    tight = _registry(budget=default)  # room for the worker's default context only
    try:
        with pytest.raises(ApiError) as err:
            tight.load("a.gguf", tiny, ModelSettings(n_ctx=4 * N_CTX))
        assert err.value.code == "insufficient_memory" and err.value.details["need_bytes"] == large
        assert tight.load("a.gguf", tiny).estimated_bytes == default
    finally:
        tight.unload_all()
    roomy = _registry(budget=large)
    try:
        assert roomy.load("a.gguf", tiny, ModelSettings(n_ctx=4 * N_CTX)).estimated_bytes == large
        assert roomy.snapshot()[0]["n_ctx"] == 4 * N_CTX
    finally:
        roomy.unload_all()
