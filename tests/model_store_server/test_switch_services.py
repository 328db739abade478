"""POST /admin/switch against real services (gunicorn, llama.cpp, tiny GGUF models): the switch waits
while a generation of the model it unloads is running, and the four snapshots hold the worker's own
figures. The rules, and that the drained generation completes, are tested fast over a FakeWorker in
test_switch.py (reading a held stream on sometimes stalled for tens of seconds in the sockets)."""

from __future__ import annotations


import pytest
import requests

from model_store_server.switch import SNAPSHOTS
from tests.support.held_stream import answered_after_hold

pytestmark = pytest.mark.slow


def test_switch_drains_a_running_generation_and_reports_four_snapshots(services, make_model, tmp_path):
    models = tmp_path / "store-models"
    make_model(models, "a.gguf", seed=1, size_mb=8)
    make_model(models, "b.gguf", seed=2, size_mb=8)
    worker = services.worker(env={"MAX_LOADED_MODELS": "1"}, extra=["--n-ctx", "4096"])
    store = services.store(models, worker, max_cache_size=3,
                           extra=["--max-swap-wait-ms", "0", "--switch-settle-s", "0.3"])
    assert requests.post(store.url + "/admin/load", json={"model": "a.gguf"}, timeout=60).json()["loaded"] == ["a.gguf"]

    # a's stream is held unread, so it is running when the switch comes and until the test hangs up.
    r = answered_after_hold(store.url, "a.gguf", lambda: requests.post(store.url + "/admin/switch",
                                                                        json={"model": "b.gguf"}, timeout=120))

    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["action"], body["unloaded"], body["loaded"]) == \
        ("b.gguf", "load_from_store", ["a.gguf"], ["b.gguf"])

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
