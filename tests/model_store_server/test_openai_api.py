"""The store's OpenAI-compatible endpoints, driven by the official openai client against real services."""

from __future__ import annotations

import json

import pytest
import requests

openai = pytest.importorskip("openai")


@pytest.fixture
def store(services, make_model, tmp_path):
    models = tmp_path / "models"
    make_model(models, "a.gguf", seed=1)
    make_model(models, "b.gguf", seed=2)
    worker = services.worker()
    return services.store(models, worker)


@pytest.fixture
def client(store):
    return openai.OpenAI(base_url=store.url + "/v1", api_key="unused", max_retries=0)


def test_models_list(client):
    assert sorted(m.id for m in client.models.list()) == ["a.gguf", "b.gguf"]


def test_completion(client):
    done = client.completions.create(model="a.gguf", prompt="hello", max_tokens=5, temperature=0)
    assert done.object == "text_completion" and done.model == "a.gguf"
    assert done.choices[0].text
    assert done.choices[0].finish_reason in ("length", "stop")
    assert done.usage.completion_tokens >= 1 and done.usage.prompt_tokens >= 1


def test_completion_stream_matches_non_stream(client):
    whole = client.completions.create(model="a.gguf", prompt="hello", max_tokens=6, temperature=0)
    pieces = [c.choices[0].text for c in client.completions.create(model="a.gguf", prompt="hello", max_tokens=6,
                                                                   temperature=0, stream=True)]
    assert "".join(pieces) == whole.choices[0].text


def test_chat_completion_and_stream(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(model="b.gguf", messages=messages, max_tokens=6, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content
    chunks = list(client.chat.completions.create(model="b.gguf", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_raw_stream_is_sse_with_cache_headers(store):
    r = requests.post(store.url + "/v1/completions", stream=True,
                      json={"model": "a.gguf", "prompt": "hi", "max_tokens": 3, "stream": True})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    lines = [line for line in r.iter_lines() if line]
    # A swap that takes long starts the stream early: progress and the outcome then come as comments.
    comments = [line for line in lines if line.startswith(b":")]
    frames = [line for line in lines if not line.startswith(b":")]
    action = r.headers.get("X-Cache-Action") or next(
        c.split(b"x-cache-action=")[1].split()[0].decode() for c in comments if b"x-cache-action=" in c)
    assert action == "load_from_store"
    assert all(f.startswith(b"data: ") for f in frames)
    assert frames[-1] == b"data: [DONE]"
    assert json.loads(frames[0][6:])["object"] == "text_completion"


def test_errors(client, store):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="missing.gguf", prompt="hi")
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="a.gguf", prompt="hi", n=2)
    assert err.value.body["code"] == "unsupported_parameter"
    r = requests.post(store.url + "/v1/chat/completions", json={"model": "a.gguf", "messages": [{"role": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    r = requests.post(store.url + "/v1/completions", json={"model": "../a.gguf", "prompt": "hi"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_model_name"
