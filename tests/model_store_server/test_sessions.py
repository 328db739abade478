"""Chat sessions, presets and `model: "active"` through a real store and a real worker with tiny models.

Each test uses its own session ids, so one store+worker pair serves the module; the store
restart has its own pair.
"""

from __future__ import annotations

import json
import threading
import uuid

import pytest
import requests

openai = pytest.importorskip("openai")

SHORT_CTX = 160
CONFIG = f"""
[models.alpha]
file = "a.gguf"
[models.beta]
file = "b.gguf"
[models.short]
file = "c.gguf"
n_ctx = {SHORT_CTX}

[presets.terse]
system = "Answer in one word."
model = "beta"
[presets.terse.sampling]
max_tokens = 3
temperature = 0
"""


@pytest.fixture(scope="module")
def pair(module_services, module_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("sessions")
    models = root / "models"
    for seed, name in enumerate(("a.gguf", "b.gguf", "c.gguf"), start=1):
        module_model(models, name, seed=seed)
    (root / "models.toml").write_text(CONFIG)
    worker = module_services.worker(cache_dir=root / "cache")
    store = module_services.store(models, worker, max_cache_size=3,
                                  extra=["--models-config", str(root / "models.toml")])
    return store, worker


@pytest.fixture
def sid() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def _chat(url: str, sid: str | None, content: str, **fields) -> requests.Response:
    headers = {"X-Session-Id": sid} if sid else {}
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0, **fields}
    return requests.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)


def _session(url: str, sid: str) -> dict:
    r = requests.get(f"{url}/sessions/{sid}", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _tokens(worker_url: str, model: str, messages: list[dict]) -> int:
    r = requests.post(worker_url + "/tokenize", json={"model": model, "messages": messages}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def _turns(session: dict) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in session["messages"]]


def test_second_turn_on_another_model_carries_the_first(pair, sid):
    """The openai client: extra_headers on the first turn, extra_body on the second, which switches model."""
    store, worker = pair
    client = openai.OpenAI(base_url=store.url + "/v1", api_key="unused", max_retries=0)
    first = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "My name is Ada."}],
                                           max_tokens=6, temperature=0, extra_headers={"X-Session-Id": sid})
    second = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "What is my name?"}],
                                            max_tokens=6, temperature=0, extra_body={"session_id": sid})
    session = _session(store.url, sid)
    assert _turns(session) == [{"role": "user", "content": "My name is Ada."},
                               {"role": "assistant", "content": first.choices[0].message.content},
                               {"role": "user", "content": "What is my name?"},
                               {"role": "assistant", "content": second.choices[0].message.content}]
    answers = [m for m in session["messages"] if m["role"] == "assistant"]
    assert [a["model"] for a in answers] == ["a.gguf", "b.gguf"]
    assert [a["context_messages"] for a in answers] == [1, 3]
    # The second prompt is the whole conversation, as beta's tokenizer and template count it.
    whole = _tokens(worker.url, "b.gguf", _turns(session)[:3])
    assert answers[1]["prompt_tokens"] == second.usage.prompt_tokens == whole
    assert answers[1]["prompt_tokens"] > _tokens(worker.url, "b.gguf", _turns(session)[2:3])
    assert answers[1]["completion_tokens"] == second.usage.completion_tokens


def test_streamed_answers_are_appended_on_both_apis(pair, sid):
    store, _ = pair
    r = requests.post(store.url + "/v1/chat/completions", stream=True, timeout=60,
                      json={"model": "alpha", "messages": [{"role": "user", "content": "one"}], "max_tokens": 6,
                            "stream": True, "session_id": sid})
    streamed = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                       for line in r.iter_lines(decode_unicode=True)
                       if line.startswith("data: {"))
    r = requests.post(store.url + "/api/chat", stream=True, timeout=60, headers={"X-Session-Id": sid},
                      json={"model": "beta", "messages": [{"role": "user", "content": "two"}],
                            "options": {"num_predict": 6}})
    lines = [json.loads(line) for line in r.iter_lines() if line]
    ollama = "".join(line["message"]["content"] for line in lines)
    assert lines[-1]["done"] and lines[-1]["prompt_eval_count"] > 0
    session = _session(store.url, sid)
    assert [m["content"] for m in session["messages"]] == ["one", streamed, "two", ollama]
    assert session["messages"][3]["prompt_tokens"] == lines[-1]["prompt_eval_count"]


def test_a_failed_generation_appends_nothing(pair, sid):
    store, _ = pair
    assert _chat(store.url, sid, "kept", model="alpha").status_code == 200
    r = _chat(store.url, sid, "x " * 2000, model="short")  # longer than short's context: prompt_too_long
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"
    assert [m["content"] for m in _session(store.url, sid)["messages"]][:1] == ["kept"]
    assert len(_session(store.url, sid)["messages"]) == 2


def test_history_is_trimmed_by_the_target_models_tokens(pair, sid):
    """Each turn alone fits short's context; together they do not. The oldest turns go, the preset's system
    prompt stays, and the prompt fits (no prompt_too_long)."""
    store, worker = pair
    long_text = " ".join(f"word{i}" for i in range(12))
    for turn in range(6):
        r = _chat(store.url, sid, f"{turn}: {long_text}", model="short", preset="terse")
        assert r.status_code == 200, r.text
    session = _session(store.url, sid)
    assert session["preset"] == "terse" and len(session["messages"]) == 12
    last = session["messages"][-1]
    assert last["model"] == "c.gguf"
    kept = last["context_messages"] - 2  # the system prompt and the request's own message
    assert 0 <= kept < 10, "the history should have been trimmed"
    sent = [{"role": "system", "content": "Answer in one word."}, *_turns(session)[10 - kept:11]]
    assert last["prompt_tokens"] == _tokens(worker.url, "c.gguf", sent)
    assert last["prompt_tokens"] <= SHORT_CTX - 3  # room for the answer (the preset's max_tokens)
    # Without the trim, the same conversation would not fit.
    assert _tokens(worker.url, "c.gguf", [sent[0], *_turns(session)[:11]]) > SHORT_CTX


def test_concurrent_requests_on_one_session_are_serialized(pair, sid):
    store, _ = pair
    barrier = threading.Barrier(2)
    statuses: list[int] = []

    def turn(text: str) -> None:
        barrier.wait()
        statuses.append(_chat(store.url, sid, text, model="alpha", max_tokens=48).status_code)

    threads = [threading.Thread(target=turn, args=(t,)) for t in ("left", "right")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200, 200]
    messages = _session(store.url, sid)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert {messages[0]["content"], messages[2]["content"]} == {"left", "right"}
    # The second saw the first's whole turn: no interleaving, no lost message.
    assert [m["context_messages"] for m in messages if m["role"] == "assistant"] == [1, 3]


def test_preset_gives_the_model_system_prompt_and_sampling(pair, sid):
    store, worker = pair
    r = requests.post(store.url + "/v1/chat/completions", timeout=60, headers={"X-Session-Id": sid},
                      json={"preset": "terse", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "b.gguf" and body["usage"]["completion_tokens"] <= 3
    sent = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "hi"}]
    assert body["usage"]["prompt_tokens"] == _tokens(worker.url, "b.gguf", sent)
    # The session keeps its preset: the next turn names none and still gets it.
    r = _chat(store.url, sid, "again", model="alpha", max_tokens=None)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    assert _session(store.url, sid)["preset"] == "terse"
    r = _chat(store.url, None, "x", preset="nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "preset_not_found"


def _unload_all(url: str) -> None:
    for name in ("a.gguf", "b.gguf", "c.gguf"):
        assert requests.post(url + "/admin/unload", json={"model": name}, timeout=30).status_code == 200


def test_active_means_the_model_loaded_last(pair):
    store, _ = pair
    _unload_all(store.url)
    r = _chat(store.url, None, "hi", model="active")
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_active_model"
    assert _chat(store.url, None, "hi", model="beta").status_code == 200
    r = _chat(store.url, None, "hi", model="active")
    assert r.status_code == 200 and r.json()["model"] == "b.gguf"
    assert _chat(store.url, None, "hi", model="alpha").status_code == 200
    sid = f"t-{uuid.uuid4().hex[:12]}"
    r = requests.post(store.url + "/api/chat", timeout=60, headers={"X-Session-Id": sid}, json={
        "model": "active", "stream": False, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.headers["X-Cache-Action"] == "already_loaded"
    assert r.json()["model"] == "active"  # Ollama echoes the name it was given
    answer = _session(store.url, sid)["messages"][1]
    assert answer["model"] == "a.gguf" and answer["content"] == r.json()["message"]["content"]


def test_get_and_delete_a_session(pair, sid):
    store, _ = pair
    assert requests.get(f"{store.url}/sessions/{sid}", timeout=10).json()["error"]["code"] == "session_not_found"
    assert _chat(store.url, sid, "hello", model="alpha").status_code == 200
    assert requests.delete(f"{store.url}/sessions/{sid}", timeout=10).status_code == 200
    r = requests.get(f"{store.url}/sessions/{sid}", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"


@pytest.mark.parametrize("headers,body", [
    ({"X-Session-Id": "has space"}, {}), ({}, {"session_id": "x" * 129}), ({}, {"session_id": "../etc"}),
    ({}, {"session_id": 7}), ({"X-Session-Id": "one"}, {"session_id": "two"}),
])
def test_invalid_session_ids_are_refused(pair, headers, body):
    store, _ = pair
    r = requests.post(store.url + "/v1/chat/completions", headers=headers, timeout=30,
                      json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_session_id"


def test_worker_tokenize_counts_what_infer_feeds(pair):
    _, worker = pair
    messages = [{"role": "user", "content": "count these words"}]
    assert requests.post(worker.url + "/load_model_from_local_store", headers={"X-Model-Name": "a.gguf"},
                         timeout=30).status_code in (200, 201)
    r = requests.post(worker.url + "/infer", timeout=30, json={"model": "a.gguf", "messages": messages,
                                                               "max_tokens": 2, "stream_format": "ndjson"})
    summary = [line for line in r.iter_lines() if line][-1]
    assert json.loads(summary)["prompt_tokens"] == _tokens(worker.url, "a.gguf", messages)
    r = requests.post(worker.url + "/tokenize", json={"model": "a.gguf", "prompt": "count these words"}, timeout=30)
    assert r.json()["tokens"] >= 3 and r.json()["n_ctx"] > 0
    r = requests.post(worker.url + "/tokenize", json={"model": "nope.gguf", "prompt": "x"}, timeout=30)
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_not_loaded"


def test_a_session_survives_a_store_restart(services, make_model, tmp_path):
    models = tmp_path / "models"
    make_model(models, "a.gguf", seed=1)
    make_model(models, "b.gguf", seed=2)
    worker = services.worker()
    store = services.store(models, worker)
    assert _chat(store.url, "keep-me", "before", model="a.gguf").status_code == 200
    store.stop()
    store = services.store(models, worker)
    assert [m["content"] for m in _session(store.url, "keep-me")["messages"]][0] == "before"
    assert _chat(store.url, "keep-me", "after", model="b.gguf").status_code == 200
    answers = [m for m in _session(store.url, "keep-me")["messages"] if m["role"] == "assistant"]
    assert [a["context_messages"] for a in answers] == [1, 3]
