"""Every OpenAI parameter the store accepts has its effect, or is refused (openai client, real services)."""

from __future__ import annotations

import pytest
import requests

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def store(module_services, module_model, tmp_path_factory):
    """One worker and store for the module; every request is for the same model, so nothing swaps."""
    models = tmp_path_factory.mktemp("sampling") / "models"
    module_model(models, "a.gguf", seed=1)
    return module_services.store(models, module_services.worker())


@pytest.fixture
def client(store):
    return openai.OpenAI(base_url=store.url + "/v1", api_key="unused", max_retries=0)


def complete(client, **kw) -> str:
    return client.completions.create(model="a.gguf", prompt="hello", **{"max_tokens": 16, **kw}).choices[0].text


def test_seed_makes_sampling_repeatable(client):
    first = complete(client, temperature=0.8, seed=7)
    assert complete(client, temperature=0.8, seed=7) == first
    others = {complete(client, temperature=0.8, seed=s) for s in (8, 9, 10)}
    assert others - {first}, "different seeds should give some different text"


def test_top_p_narrows_sampling_to_the_likeliest_token(client):
    greedy = complete(client, temperature=0)
    assert {complete(client, temperature=0.8, seed=s, top_p=1e-9) for s in (1, 2, 3)} == {greedy}


def test_stop_ends_the_text_before_the_stop_string(client):
    text = complete(client, temperature=0, max_tokens=30)
    stop = text[10:13]
    done = client.completions.create(model="a.gguf", prompt="hello", max_tokens=30, temperature=0, stop=[stop])
    assert done.choices[0].text == text[: text.index(stop)] and done.choices[0].finish_reason == "stop"


def test_stop_in_a_chat_joins_the_templates_own_stop_strings(client):
    def chat(**kw):
        return client.chat.completions.create(model="a.gguf", messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=30, temperature=0, **kw).choices[0]

    text = chat().message.content
    stop = text[10:13]
    done = chat(stop=[stop, "\nUser:"])  # "\nUser:" is the plain template's own: given twice, used once
    assert done.message.content == text[: text.index(stop)] and done.finish_reason == "stop"


@pytest.mark.parametrize("penalty", ["presence_penalty", "frequency_penalty"])
def test_penalties_change_greedy_text(client, penalty):
    assert complete(client, temperature=0, max_tokens=30, **{penalty: 2.0}) != complete(client, temperature=0,
                                                                                        max_tokens=30)


def test_max_completion_tokens_bounds_the_tokens(client):
    done = client.completions.create(model="a.gguf", prompt="hello", temperature=0, max_tokens=None,
                                     extra_body={"max_completion_tokens": 3})
    assert done.usage.completion_tokens == 3 and done.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="a.gguf", messages=[{"role": "user", "content": "hi"}],
                                                 temperature=0, max_completion_tokens=3, stream=True))
    assert 1 <= sum(1 for c in chunks if c.choices[0].delta.content) <= 3
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("extra", [{"logit_bias": {"50": 10}}, {"n": 2},
                                   {"parallel_tool_calls": True}, {"no_such_parameter": 1}])
def test_parameters_without_effect_are_refused(store, extra):
    body = {"model": "a.gguf", "prompt": "hi", "max_tokens": 2, "stream": True, **extra}
    r = requests.post(store.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter", r.text
    r = requests.post(store.url + "/user_request", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter", r.text


@pytest.mark.parametrize("extra", [{"top_p": 2}, {"seed": -1}, {"seed": "x"}, {"stop": [1]}, {"stop": ["a"] * 5},
                                   {"presence_penalty": 3}, {"max_tokens": 4, "max_completion_tokens": 5}])
def test_out_of_range_values_are_invalid(store, extra):
    r = requests.post(store.url + "/v1/completions", json={"model": "a.gguf", "prompt": "hi", **extra}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request", r.text


def test_user_request_takes_the_same_sampling_parameters(store):
    body = {"model": "a.gguf", "prompt": "hello", "max_tokens": 12, "temperature": 0.8, "seed": 5}
    first = requests.post(store.url + "/user_request", json=body, timeout=30).content
    assert requests.post(store.url + "/user_request", json=body, timeout=30).content == first
