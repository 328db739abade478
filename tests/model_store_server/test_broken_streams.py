"""An answer the worker stops sending half-way is an error on the OpenAI routes, not a short success
(fast seam: a FakeWorker whose stream breaks; Ollama's routes already say so in an error line)."""

from __future__ import annotations

import json

from tests.support.store_harness import fake_store


def test_a_broken_answer_is_a_502_not_a_short_completion(tmp_path):
    app, fake = fake_store(tmp_path)
    fake.break_streams("a.gguf")
    with app.test_client() as client:
        r = client.post("/v1/chat/completions", json={"model": "a.gguf", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 502
    assert r.get_json()["error"]["code"] == "worker_error"


def test_a_broken_stream_ends_with_an_error_event_and_no_done(tmp_path):
    app, fake = fake_store(tmp_path)
    fake.break_streams("a.gguf")
    with app.test_client() as client:
        r = client.post("/v1/completions", json={"model": "a.gguf", "prompt": "hi", "stream": True})
        body = r.get_data(as_text=True)
    assert r.status_code == 200  # the status line went out with the first piece
    events = [e[len("data: "):] for e in body.split("\n\n") if e.startswith("data: ")]
    assert "[DONE]" not in events
    assert json.loads(events[-1])["error"]["code"] == "worker_error"
    assert any(json.loads(e).get("choices") for e in events[:-1])  # what did arrive was passed on
