"""POST /admin/switch against real services (gunicorn, llama.cpp, tiny GGUF models): a running
generation completes before its model is unloaded, and the four snapshots hold the worker's own
figures. The rules are tested fast over a FakeWorker in test_switch.py."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from model_store_server.switch import SNAPSHOTS

pytestmark = pytest.mark.slow


def test_switch_drains_a_running_generation_and_reports_four_snapshots(services, make_model, tmp_path):
    models = tmp_path / "store-models"
    make_model(models, "a.gguf", seed=1, size_mb=8)
    make_model(models, "b.gguf", seed=2, size_mb=8)
    worker = services.worker(env={"MAX_LOADED_MODELS": "1"})
    store = services.store(models, worker, max_cache_size=3,
                           extra=["--max-swap-wait-ms", "0", "--switch-settle-s", "0.3"])
    assert requests.post(store.url + "/admin/load", json={"model": "a.gguf"}, timeout=60).json()["loaded"] == ["a.gguf"]

    frames: list[dict | str] = []
    started = threading.Event()
    ended = {}

    def generate():
        # Greedy: a tiny model's end-of-text token is rarely the likeliest, so it runs all 1000 tokens.
        request = {"model": "a.gguf", "prompt": "count", "max_tokens": 1000, "temperature": 0, "stream": True}
        with requests.post(store.url + "/v1/completions", json=request, stream=True, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith(b"data: "):
                    data = line[6:].decode()
                    frames.append(data if data == "[DONE]" else json.loads(data))
                    started.set()
        ended["at"] = time.monotonic()

    t = threading.Thread(target=generate)
    t.start()
    assert started.wait(30), "the generation did not start"
    sent_at = time.monotonic()
    r = requests.post(store.url + "/admin/switch", json={"model": "b.gguf"}, timeout=120)
    answered_at = time.monotonic()
    t.join(60)

    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["action"], body["unloaded"], body["loaded"]) == \
        ("b.gguf", "load_from_store", ["a.gguf"], ["b.gguf"])
    # The generation was running when the switch came, and it completed: a finish reason, then [DONE].
    assert sent_at < ended["at"] <= answered_at
    assert frames[-1] == "[DONE]" and frames[-2]["choices"][0]["finish_reason"] == "length"
    assert not any(isinstance(f, dict) and "error" in f for f in frames)

    snaps = body["snapshots"]
    assert sorted(snaps) == sorted(SNAPSHOTS)
    for label in SNAPSHOTS:
        s = snaps[label]
        assert isinstance(s["rss_bytes"], int) and s["rss_bytes"] > 0, (label, s)
        assert isinstance(s["host_available_bytes"], int) and s["host_available_bytes"] > 0, (label, s)
        assert s["gpu"] is None  # no GPU here: null, not a number
    assert [snaps[k]["loaded"] for k in SNAPSHOTS] == [["a.gguf"], [], [], ["b.gguf"]]
    assert snaps["after_settle"]["at_ms"] - snaps["after_unload"]["at_ms"] >= 300
    assert snaps["after_load"]["used_bytes"] > 0 and snaps["after_unload"]["used_bytes"] == 0
    assert snaps["after_load"]["rss_bytes"] > snaps["after_unload"]["rss_bytes"]  # b's weights came in
