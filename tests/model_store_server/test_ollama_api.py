"""The store's Ollama API, driven by the official ollama client (and plain HTTP where the client has no call).

One store+worker pair serves the module: lru-ttl with a long ttl, so a file on disk has an expiry too.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone

import pytest
import requests

ollama = pytest.importorskip("ollama")

CONFIG = """
[models.alpha]
file = "a.gguf"
aliases = ["first"]
n_ctx = 512
[models.alpha.sampling]
temperature = 0
"""
TTL_S = 600


@pytest.fixture(scope="module")
def store(module_services, module_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("ollama-api")
    models = root / "models"
    module_model(models, "a.gguf", seed=1)
    module_model(models, "b.gguf", seed=2)
    (root / "models.toml").write_text(CONFIG)
    worker = module_services.worker(cache_dir=root / "cache")
    store = module_services.store(models, worker, policy="lru-ttl", max_cache_size=3, ttl_seconds=TTL_S,
                                  extra=["--models-config", str(root / "models.toml")])
    store.models_dir = models
    store.worker_url = worker.url
    return store


@pytest.fixture(scope="module")
def client(store):
    return ollama.Client(host=store.url)


def test_version(store):
    r = requests.get(store.url + "/api/version")
    assert r.status_code == 200 and r.json()["version"]


def test_list(client, store):
    models = {m.model: m for m in client.list().models}
    assert set(models) == {"alpha", "b.gguf"}  # each file once, under its config name when it has one
    for name, file in (("alpha", "a.gguf"), ("b.gguf", "b.gguf")):
        data = (store.models_dir / file).read_bytes()
        assert models[name].size == len(data) and models[name].digest == hashlib.sha256(data).hexdigest()
        assert models[name].details.format == "gguf" and models[name].details.family == "llama"


def test_show(client):
    shown = client.show("first")
    assert shown.details.family == "llama"
    assert shown.modelinfo["llama.context_length"] == 2048  # read from the GGUF file
    assert shown.parameters == "temperature 0"
    assert shown.template == "plain (fallback)"  # the tiny file has no chat template of its own
    with pytest.raises(ollama.ResponseError) as err:
        client.show("nope")
    assert err.value.status_code == 404 and "not found" in err.value.error


def test_generate_streamed_and_not(client):
    whole = client.generate(model="alpha", prompt="hello", options={"num_predict": 6})
    assert whole.done and whole.done_reason in ("stop", "length") and whole.response
    assert 1 <= whole.eval_count <= 6 and whole.prompt_eval_count >= 1 and whole.total_duration > 0
    parts = list(client.generate(model="alpha", prompt="hello", options={"num_predict": 6}, stream=True))
    *pieces, last = parts
    assert not any(p.done for p in pieces) and last.done and last.eval_count == whole.eval_count
    assert "".join(p.response for p in parts) == whole.response  # alpha's config makes it deterministic
    raw = client.generate(model="alpha", prompt="hello", raw=True, options={"num_predict": 6})
    assert raw.response and raw.prompt_eval_count < whole.prompt_eval_count  # no template around the prompt


def test_chat_streamed_and_not(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    whole = client.chat(model="alpha", messages=messages, options={"num_predict": 5})
    assert whole.message.role == "assistant" and whole.message.content and whole.done
    parts = list(client.chat(model="alpha", messages=messages, options={"num_predict": 5}, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].done and parts[-1].eval_count == whole.eval_count <= 5


def test_options_are_applied_or_refused(client):
    assert client.generate(model="b", prompt="hi", options={"num_predict": 2}).eval_count <= 2
    same = {client.generate(model="b", prompt="hi", options={"num_predict": 8, "temperature": 0}).response
            for _ in range(2)}
    assert len(same) == 1
    for option in ({"top_k": 10}, {"num_ctx": 4096}, {"no_such_option": 1}):
        with pytest.raises(ollama.ResponseError) as err:
            client.generate(model="b", prompt="hi", options=option)
        assert err.value.status_code == 400 and isinstance(err.value.error, str)


def test_sampling_options_are_applied(client, store):
    def generate(**options):
        return client.generate(model="b", prompt="hello", raw=True, options={"num_predict": 20, **options})

    seeded = generate(temperature=0.9, seed=3).response
    assert generate(temperature=0.9, seed=3).response == seeded
    text = generate(temperature=0).response
    stop = text[8:11]
    assert generate(temperature=0, stop=[stop]).response == text[: text.index(stop)]
    assert generate(temperature=0, top_p=1e-9).response == text  # only the likeliest token is left
    assert generate(temperature=0, presence_penalty=2.0).response != text


def test_each_generation_request_logs_one_line(client, store):
    def lines() -> list[str]:
        return [line for line in store.log().splitlines() if "[/api/generate]" in line or "[/api/chat]" in line]

    before = len(lines())
    client.generate(model="b", prompt="hi", options={"num_predict": 1})
    client.chat(model="b", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 1})
    with pytest.raises(ollama.ResponseError):
        client.generate(model="b", prompt="hi", options={"top_k": 10})
    new = lines()[before:]
    assert len(new) == 3 and "model=b.gguf" in new[0] and "[/api/chat]" in new[1]
    assert "error=unsupported_parameter" in new[2]  # Ollama's {"error": "..."} shape still yields the code


def test_format_json(client):
    answer = client.chat(model="b", messages=[{"role": "user", "content": "JSON please"}], format="json",
                         options={"num_predict": 64, "temperature": 0})
    assert answer.done_reason == "stop" and isinstance(json.loads(answer.message.content), dict)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    answer = client.generate(model="b", prompt="a number", format=schema, options={"num_predict": 64, "temperature": 0})
    assert isinstance(json.loads(answer.response)["n"], int)


def test_ps_shows_what_is_loaded_and_what_is_on_disk(client, store):
    client.generate(model="alpha", prompt="hi", options={"num_predict": 1})
    # The store keeps several models resident: Ollama's unload request takes alpha out of memory.
    assert client.generate(model="alpha", keep_alive=0).done_reason == "unload"
    client.generate(model="b", prompt="hi", options={"num_predict": 1}, keep_alive="7m")
    asked = datetime.now(timezone.utc)
    running = client.ps().models
    assert [m.model for m in running] == ["b.gguf"]
    assert running[0].size == (store.models_dir / "b.gguf").stat().st_size
    assert running[0].expires_at is not None  # b's keep-alive says when it leaves memory, not the ttl
    assert timedelta(minutes=6) < running[0].expires_at - asked <= timedelta(minutes=7)
    body = requests.get(store.url + "/api/ps").json()
    assert [m["model"] for m in body["on_disk"]] == ["alpha"]
    assert body["on_disk"][0]["state"] == "on_disk" and body["on_disk"][0]["context_length"] == 512


def test_ps_lists_every_model_the_worker_holds(client, store):
    client.generate(model="b", prompt="hi", options={"num_predict": 1})
    # The worker keeps models side by side: one loaded there directly is resident too.
    direct = requests.post(store.worker_url + "/load_model_from_local_store", headers={"X-Model-Name": "a.gguf"},
                           json={"settings": {"n_ctx": 128}})
    assert direct.status_code == 200, direct.text
    try:
        running = requests.get(store.url + "/api/ps").json()
        assert [(m["file"], m["state"]) for m in running["models"]] == [("b.gguf", "loaded"), ("a.gguf", "loaded")]
        assert running["models"][1]["context_length"] == 128  # what the worker opened it with
        assert running["on_disk"] == []
        assert [m.model for m in client.ps().models] == ["b.gguf", "alpha"]
    finally:
        requests.post(store.worker_url + "/unload", json={"model": "a.gguf"})


def test_requests_go_through_the_swap_path(store):
    r = requests.post(store.url + "/api/generate", json={"model": "b", "prompt": "hi", "stream": False,
                                                         "keep_alive": "5m", "options": {"num_predict": 2}})
    assert r.status_code == 200 and r.headers["X-Cache-Action"] in ("already_loaded", "load_from_local_store",
                                                                    "load_from_store")
    assert r.headers["X-Chat-Template"] == "fallback:plain"
    loaded = requests.post(store.url + "/api/generate", json={"model": "alpha"})  # Ollama's "load this model"
    assert loaded.json()["done_reason"] == "load" and loaded.headers["X-Cache-Action"]


def test_errors_in_ollama_shape(store, client):
    r = requests.post(store.url + "/api/chat", json={"model": "alpah", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["code"] == "model_not_found" and r.json()["closest"][0] == "alpha"
    assert isinstance(r.json()["error"], str)
    r = requests.post(store.url + "/api/generate", json={"model": "b", "prompt": "x", "keep_alive": "soon"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_request"
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("llama3")
    assert err.value.status_code == 501
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="b", messages=[{"role": "user", "content": "what is this?", "images": [b"\x89PNG"]}])
    assert err.value.status_code == 400
