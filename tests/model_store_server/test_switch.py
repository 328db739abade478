"""POST /admin/switch and /admin/load over a FakeWorker (a fast seam; tests/model_store_server/
test_switch_services.py is the real-service tier): drains before unloading, four readings in order,
the settle wait only after an unload, switches one at a time, token required."""

from __future__ import annotations

import threading
import time

from model_store_server.outcome import Outcome
from model_store_server.switch import SNAPSHOTS
from model_swap.web import parse_generation
from tests.support.fake_worker import FAKE_BASE_RSS, FakeWorker, worker_error
from tests.support.store_harness import core_of, fake_store, wait_for


def switch(client, model, **headers):
    return client.post("/admin/switch", json={"model": model}, headers=headers)


def test_switch_unloads_reads_memory_four_times_and_loads(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=1), max_cache_size=3, switch_settle_s=0.2)
    client = app.test_client()
    assert client.post("/admin/load", json={"model": "a.gguf"}).json["loaded"] == ["a.gguf"]
    size_a = fake.loaded["a.gguf"].memory_bytes

    started = time.monotonic()
    r = switch(client, "b.gguf")
    assert r.status_code == 200, r.json
    body = r.json
    assert (body["model"], body["action"], body["unloaded"], body["loaded"]) == \
        ("b.gguf", "load_from_store", ["a.gguf"], ["b.gguf"])
    snaps = body["snapshots"]
    assert sorted(snaps) == sorted(SNAPSHOTS)
    assert [snaps[k]["at_ms"] for k in SNAPSHOTS] == sorted(snaps[k]["at_ms"] for k in SNAPSHOTS)
    assert [snaps[k]["loaded"] for k in SNAPSHOTS] == [["a.gguf"], [], [], ["b.gguf"]]
    assert snaps["before_unload"]["rss_bytes"] == FAKE_BASE_RSS + size_a
    assert snaps["after_unload"]["rss_bytes"] == FAKE_BASE_RSS
    # The settle wait sits between the two readings after the unload, and nowhere else.
    assert snaps["after_settle"]["at_ms"] - snaps["after_unload"]["at_ms"] >= 200
    assert body["settle_s"] == 0.2 and time.monotonic() - started >= 0.2
    assert fake.changes() == ["push a.gguf", "load a.gguf", "memory", "push b.gguf", "unload a.gguf", "memory",
                              "memory", "load b.gguf", "memory"]


def test_switch_to_a_resident_model_unloads_nothing_and_does_not_wait(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=2), switch_settle_s=5.0)
    client = app.test_client()
    client.post("/admin/load", json={"model": "a.gguf"})
    started = time.monotonic()
    body = switch(client, "a.gguf").json
    assert body["action"] == "already_loaded" and body["unloaded"] == [] and sorted(body["snapshots"]) == sorted(SNAPSHOTS)
    assert time.monotonic() - started < 2.0  # nothing was unloaded: no settle wait


def test_a_switch_to_a_resident_model_makes_it_active(tmp_path):
    """Both models stay resident; "active" follows the switch, not only the last load."""
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=2), switch_settle_s=0.0)
    client = app.test_client()
    for name in ("a.gguf", "b.gguf"):
        assert client.post("/admin/load", json={"model": name}).status_code == 200
    assert core_of(app).active_model() == "b.gguf"
    assert switch(client, "a.gguf").json["action"] == "already_loaded"
    assert core_of(app).active_model() == "a.gguf"
    r = client.post("/user_request", json={"model": "active", "prompt": "hi"})
    r.get_data()
    assert r.status_code == 200 and fake.generations[-1] == "a.gguf"
    assert client.post("/admin/load", json={"model": "c.gguf"}).status_code == 200  # a load still takes over
    assert core_of(app).active_model() == "c.gguf"


def test_switch_waits_for_a_running_generation_to_complete(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=1), max_cache_size=3, switch_settle_s=0.0,
                           max_swap_wait_ms=0)
    client = app.test_client()
    client.post("/admin/load", json={"model": "a.gguf"})
    fake.hold("a.gguf")
    lease = core_of(app).lease("a.gguf", None, Outcome())
    stream = fake.infer("a.gguf", parse_generation({"prompt": "hi"}))
    pieces = fake.iter_text(stream)
    assert next(pieces) == b"[a.gguf]"  # the generation is under way and held after its first piece

    result = {}
    t = threading.Thread(target=lambda: result.update(r=switch(client, "b.gguf")), daemon=True)
    t.start()
    wait_for(lambda: "push b.gguf" in fake.calls)
    time.sleep(0.2)
    assert "unload a.gguf" not in fake.calls and "r" not in result  # the switch waits for the stream
    fake.release("a.gguf")
    assert b"".join(pieces) == b" fake text"  # the generation completes, whole
    lease.release()
    t.join(10)
    body = result["r"].json
    assert body["unloaded"] == ["a.gguf"] and body["loaded"] == ["b.gguf"]
    assert fake.calls.index("unload a.gguf") > fake.calls.index("infer a.gguf")


def test_switches_run_one_at_a_time(tmp_path):
    fake = FakeWorker(max_loaded=1)
    app, fake = fake_store(tmp_path, fake, max_cache_size=3, switch_settle_s=0.3)
    client = app.test_client()
    client.post("/admin/load", json={"model": "a.gguf"})
    bodies = {}

    def run(model):
        bodies[model] = switch(app.test_client(), model).json

    threads = [threading.Thread(target=run, args=(m,)) for m in ("b.gguf", "c.gguf")]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(10)
    def serial(first, second, before):
        return [*one(first, before), *one(second, first)]

    def one(model, victim):
        return ["memory", f"push {model}", f"unload {victim}", "memory", "memory", f"load {model}", "memory"]

    # Each switch's four readings come together: the other switch neither read nor changed anything in between.
    assert fake.changes()[2:] in (serial("b.gguf", "c.gguf", "a.gguf"), serial("c.gguf", "b.gguf", "a.gguf"))
    assert all(b["action"] == "load_from_store" for b in bodies.values())


def test_switch_reports_a_failed_reading_instead_of_numbers(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=1), switch_settle_s=0.0)
    fake.fail_next("memory", worker_error(404, "not_found", "no /memory on this worker"))
    body = switch(app.test_client(), "a.gguf").json
    assert body["snapshots"]["before_unload"] == {"at_ms": body["snapshots"]["before_unload"]["at_ms"],
                                                  "error": "not_found"}
    assert body["snapshots"]["after_load"]["loaded"] == ["a.gguf"]


def test_switch_and_load_need_the_token_and_a_known_model(tmp_path):
    app, _ = fake_store(tmp_path, FakeWorker(), api_key="k3y")
    client = app.test_client()
    assert switch(client, "a.gguf").json["error"]["code"] == "unauthorized"
    assert client.post("/admin/load", json={"model": "a.gguf"}).status_code == 401
    auth = {"Authorization": "Bearer k3y"}
    r = switch(client, "nope.gguf", **auth)
    assert r.status_code == 404 and r.json["error"]["code"] == "model_not_found"
    assert switch(client, "../x.gguf", **auth).json["error"]["code"] == "invalid_model_name"
    assert client.post("/admin/switch", json={}, headers=auth).status_code == 400


def test_exclusive_switch_unloads_every_other_unpinned_model_even_when_all_fit(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=3), max_cache_size=3, switch_settle_s=0.0,
                           pinned_models=("c.gguf",))
    client = app.test_client()
    wait_for(lambda: "c.gguf" in fake.loaded)  # the pinned model is preloaded
    client.post("/admin/load", json={"model": "a.gguf"})
    body = switch(client, "b.gguf").json  # all three fit: a plain switch unloads nothing
    assert body["unloaded"] == [] and sorted(body["loaded"]) == ["a.gguf", "b.gguf", "c.gguf"]
    assert body["settle_s"] == 0.0  # nothing unloaded: no settle wait
    r = client.post("/admin/switch", json={"model": "b.gguf", "exclusive": True})
    assert r.json["unloaded"] == ["a.gguf"] and sorted(r.json["loaded"]) == ["b.gguf", "c.gguf"]
    assert r.json["action"] == "already_loaded" and r.json["snapshots"]["after_unload"]["loaded"] == ["c.gguf", "b.gguf"]
    bad = client.post("/admin/switch", json={"model": "b.gguf", "exclusive": "yes"})
    assert bad.status_code == 400 and bad.json["error"]["param"] == "exclusive"


def test_exclusive_switch_reads_memory_right_after_its_unloads_before_the_transfer(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=3), max_cache_size=3, switch_settle_s=0.0)
    client = app.test_client()
    client.post("/admin/load", json={"model": "a.gguf"})
    body = client.post("/admin/switch", json={"model": "b.gguf", "exclusive": True}).json
    assert body["action"] == "load_from_store" and body["unloaded"] == ["a.gguf"]
    assert fake.changes()[2:] == ["memory", "unload a.gguf", "memory", "memory", "push b.gguf", "load b.gguf", "memory"]
