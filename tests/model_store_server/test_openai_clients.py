"""What the official openai client sees from the store: names, content parts, usage, logprobs, JSON output,
chat templates, per-model settings and the error shape. One store+worker pair serves the module."""

from __future__ import annotations

import json

import pytest
import requests

openai = pytest.importorskip("openai")

GEMMA = "gemma-3-270m-q4_k_m.gguf"
CONFIG = f"""
[models.alpha]
file = "a.gguf"
aliases = ["first-model"]
logprobs = true
[models.alpha.sampling]
temperature = 0

[models.short]
file = "c.gguf"
n_ctx = 64
chat_template = "chatml"

[models.gemma]
file = "{GEMMA}"
"""


@pytest.fixture(scope="module")
def store(module_services, module_model, real_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai-clients")
    models = root / "models"
    module_model(models, "a.gguf", seed=1)
    module_model(models, "b.gguf", seed=2)
    module_model(models, "c.gguf", seed=3)
    (models / GEMMA).symlink_to(real_model(GEMMA))
    (root / "models.toml").write_text(CONFIG)
    worker = module_services.worker(cache_dir=root / "cache")
    return module_services.store(models, worker, max_cache_size=4, extra=["--models-config", str(root / "models.toml")])


@pytest.fixture(scope="module")
def client(store):
    return openai.OpenAI(base_url=store.url + "/v1", api_key="unused", max_retries=0)


def _complete(client, **kwargs):
    return client.completions.create(**{"prompt": "hello", "max_tokens": 6, **kwargs})


def test_models_list_has_aliases(client):
    models = {m.id: m for m in client.models.list()}
    assert {"a.gguf", "b.gguf", "c.gguf", GEMMA, "alpha", "first-model", "short", "gemma"} == set(models)
    assert models["first-model"].root == "a.gguf" and models["a.gguf"].aliases == ["alpha", "first-model"]


@pytest.mark.parametrize("name", ["alpha", "first-model", "a", "A.GGUF", "a.gguf"])
def test_retrieve_and_generate_by_names_people_type(client, name):
    model = client.models.retrieve(name)
    assert model.id == name and model.object == "model"
    assert _complete(client, model=name).model == "a.gguf"  # the answer says which file served it


def test_unknown_name_is_404_with_available_names_and_closest(client):
    for call in (lambda: client.models.retrieve("alpah"), lambda: _complete(client, model="alpah")):
        with pytest.raises(openai.NotFoundError) as err:
            call()
        # The fields OpenAI clients read, with our code kept.
        assert (err.value.code, err.value.type, err.value.param) == ("model_not_found", "invalid_request_error",
                                                                     "model")
        assert err.value.body["closest"][0] == "alpha" and "b.gguf" in err.value.body["available"]


def test_content_parts_are_joined_and_images_refused(client):
    as_parts = client.chat.completions.create(model="alpha", max_tokens=6, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]}])
    as_text = client.chat.completions.create(model="alpha", max_tokens=6,
                                             messages=[{"role": "user", "content": "Hello, world"}])
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content != ""
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert err.value.code == "unsupported_content"


def test_usage_on_every_answer(client):
    done = _complete(client, model="b", temperature=0)
    chat = client.chat.completions.create(model="b", max_tokens=6, temperature=0,
                                          messages=[{"role": "user", "content": "Hi"}])
    for usage in (done.usage, chat.usage):
        assert usage.prompt_tokens >= 1 and 1 <= usage.completion_tokens <= 6
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    chunks = list(client.chat.completions.create(model="b", max_tokens=6, temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": "Hi"}]))
    *content, last = chunks
    assert last.choices == [] and last.usage == chat.usage  # the usage chunk ends the stream
    assert all(c.usage is None for c in content)
    assert "".join(c.choices[0].delta.content or "" for c in content) == chat.choices[0].message.content
    plain = list(_complete(client, model="b", temperature=0, stream=True))
    assert all(getattr(c, "usage", None) is None for c in plain)


def test_logprobs(client):
    done = _complete(client, model="alpha", logprobs=2)
    logprobs = done.choices[0].logprobs
    assert "".join(logprobs.tokens) == done.choices[0].text
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(
        logprobs.text_offset)
    assert all(lp <= 0 for lp in logprobs.token_logprobs) and all(1 <= len(t) <= 2 for t in logprobs.top_logprobs)
    streamed = list(_complete(client, model="alpha", logprobs=2, stream=True))
    assert [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == logprobs.tokens
    chat = client.chat.completions.create(model="alpha", max_tokens=4, logprobs=True, top_logprobs=3,
                                          messages=[{"role": "user", "content": "Hi"}])
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(1 <= len(t.top_logprobs) <= 3 and t.logprob <= 0 for t in content)
    with pytest.raises(openai.BadRequestError) as err:  # b.gguf is not loaded with logprobs = true
        _complete(client, model="b", logprobs=1)
    assert (err.value.code, err.value.param) == ("unsupported_parameter", "logprobs")


def test_response_format_json(client):
    messages = [{"role": "user", "content": "Give me a JSON object."}]
    as_object = client.chat.completions.create(model="b", max_tokens=64, temperature=0, messages=messages,
                                               response_format={"type": "json_object"})
    assert as_object.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(as_object.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    with_schema = client.chat.completions.create(model="b", max_tokens=64, temperature=0, messages=messages,
                                                 response_format={"type": "json_schema",
                                                                  "json_schema": {"name": "a", "schema": schema}})
    assert isinstance(json.loads(with_schema.choices[0].message.content)["answer"], int)


def test_n_above_one_is_refused(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="b", n=2, messages=[{"role": "user", "content": "Hi"}])
    assert (err.value.code, err.value.param) == ("unsupported_parameter", "n")


def test_sampling_defaults_from_the_models_config(client):
    # alpha's config sets temperature = 0: without a temperature, answers repeat...
    assert len({_complete(client, model="alpha", max_tokens=12).choices[0].text for _ in range(3)}) == 1
    # ...which is the default at work, not a model that always says the same: at temperature 1 they differ.
    assert len({_complete(client, model="alpha", max_tokens=12, temperature=1.0).choices[0].text
                for _ in range(3)}) > 1


def test_load_settings_from_the_models_config(client, store):
    # short.gguf is loaded with n_ctx = 64 and the chatml template; a.gguf with the worker's default 2048.
    long_prompt = "word " * 40
    with pytest.raises(openai.BadRequestError) as err:
        _complete(client, model="short", prompt=long_prompt)
    assert err.value.code == "prompt_too_long"
    assert _complete(client, model="alpha", prompt=long_prompt).choices[0].text
    r = requests.post(store.url + "/v1/chat/completions", json={
        "model": "short", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200 and r.headers["X-Chat-Template"] == "config:chatml"


def test_base_model_chat_returns_text_through_the_fallback_template(client):
    # The bundled gemma is a base model: its GGUF has no chat template. It used to answer every chat with "".
    for name in ("gemma", GEMMA):
        raw = client.chat.completions.with_raw_response.create(
            model=name, max_tokens=16, temperature=0, messages=[{"role": "user", "content": "What is 2+2?"}])
        assert raw.headers["X-Chat-Template"] == "fallback:plain"
        answer = raw.parse()
        assert answer.choices[0].message.content.strip()
        assert answer.usage.completion_tokens >= 1
