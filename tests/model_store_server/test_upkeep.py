"""Keep-alive, pins, preloads, ttl sweeps by timer, admin unload/evict, backpressure, events and
progress, over a FakeWorker (a fast seam; the real-service tests are the integration tier)."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from model_store_server.outcome import Outcome
from tests.support.fake_worker import FakeWorker
from tests.support.store_harness import PROMPT, ask, core_of, fake_store, wait_for


def metric(client, prefix):
    text = client.get("/metrics").get_data(as_text=True)
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


# ---- keep-alive, pins, preload, ttl ----------------------------------------------------------

def test_keep_alive_unloads_an_idle_model_by_timer(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=2), keep_alive_seconds=0.3)
    client = app.test_client()
    ask(client, "a.gguf")
    assert "a.gguf" in fake.loaded
    wait_for(lambda: not fake.loaded, 3.0)  # no request comes: the timer unloads it
    assert "a.gguf" in fake.disk, "keep-alive frees memory; the file stays cached"
    assert core_of(app).view()[0]["loaded"] == []


def test_keep_alive_never_counts_while_a_stream_runs(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=2), keep_alive_seconds=0.1)
    core = core_of(app)
    lease = core.lease("a.gguf", None, Outcome())
    time.sleep(0.4)
    assert "a.gguf" in fake.loaded
    lease.release()
    wait_for(lambda: not fake.loaded, 3.0)


@pytest.mark.parametrize("keep_alive,stays", [(0, False), ("0s", False), (-1, True), ("5m", True)])
def test_keep_alive_per_request(tmp_path, keep_alive, stays):
    """The request's keep_alive beats the default: 0 unloads a though the default is a minute; -1 and 5m keep a
    after the default's timer unloaded b, asked after a (so a would have gone first had its own been ignored)."""
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=2), keep_alive_seconds=0.2 if stays else 60)
    client = app.test_client()
    ask(client, "a.gguf", keep_alive=keep_alive)
    if stays:
        ask(client, "b.gguf")
        wait_for(lambda: "b.gguf" not in fake.loaded, 3.0)
        assert "a.gguf" in fake.loaded
    else:
        wait_for(lambda: "a.gguf" not in fake.loaded, 3.0)


def test_bad_keep_alive_is_a_400_before_anything_moves(tmp_path):
    app, fake = fake_store(tmp_path)
    r = ask(app.test_client(), "a.gguf", keep_alive="soon")
    assert r.status_code == 400 and r.json["error"]["code"] == "invalid_request" and fake.calls == []


def test_pinned_model_is_preloaded_and_never_unloaded_or_evicted(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=2), max_cache_size=2, keep_alive_seconds=0.1,
                           pinned_models=("a.gguf",))
    client = app.test_client()
    wait_for(lambda: "a.gguf" in fake.loaded)
    ask(client, "b.gguf")
    r = ask(client, "c.gguf")  # disk holds 2: b goes, not the least recently used a
    assert r.headers["X-Cache-Evicted"] == "b.gguf"
    time.sleep(0.4)  # past the keep-alive
    assert "a.gguf" in fake.loaded and "a.gguf" in fake.disk
    r = client.post("/admin/evict", json={"model": "a.gguf"})
    assert r.status_code == 409 and r.json["error"]["code"] == "model_pinned"


def test_preload_models_are_transferred_and_loaded_at_start(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=2), preload_models=("b.gguf", "a.gguf"))
    wait_for(lambda: sorted(fake.loaded) == ["a.gguf", "b.gguf"])
    r = ask(app.test_client(), "b.gguf")
    assert r.headers["X-Cache-Action"] == "already_loaded"


def test_ttl_files_are_swept_by_timer_and_busy_ones_kept(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=2), cache_policy="ttl", ttl_seconds=0.3)
    core = core_of(app)
    core.lease("a.gguf", None, Outcome()).release()
    held = core.lease("b.gguf", None, Outcome())
    wait_for(lambda: "a.gguf" not in fake.disk, 3.0)
    time.sleep(0.3)
    assert "b.gguf" in fake.disk, "a model in use is not swept under its stream"
    held.release()
    wait_for(lambda: not fake.disk, 3.0)
    assert core.view()[0]["cached"] == []


# ---- admin -----------------------------------------------------------------------------------

def test_admin_unload_keeps_the_file_and_evict_deletes_it(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=2))
    client = app.test_client()
    ask(client, "a.gguf")
    ask(client, "b.gguf")
    r = client.post("/admin/unload", json={"model": "a.gguf"})
    assert r.status_code == 200 and r.json["unloaded"] == ["a.gguf"] and r.json["evicted"] == []
    assert list(fake.loaded) == ["b.gguf"] and "a.gguf" in fake.disk
    r = client.post("/admin/evict", json={"model": "b.gguf"})
    assert r.json["unloaded"] == ["b.gguf"] and r.json["evicted"] == ["b.gguf"]
    assert fake.loaded == {} and list(fake.disk) == ["a.gguf"]
    assert ask(client, "a.gguf").headers["X-Cache-Action"] == "load_from_local_store"


def test_admin_unload_waits_for_the_models_streams(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=2))
    core = core_of(app)
    lease = core.lease("a.gguf", None, Outcome())
    done = []
    t = threading.Thread(target=lambda: done.append(core.unload("a.gguf")))
    t.start()
    time.sleep(0.2)
    assert not done and "a.gguf" in fake.loaded
    lease.release()
    t.join(5)
    assert done and not fake.loaded


def test_admin_bad_name(tmp_path):
    app, _ = fake_store(tmp_path)
    r = app.test_client().post("/admin/unload", json={"model": "../x.gguf"})
    assert r.status_code == 400 and r.json["error"]["code"] == "invalid_model_name"


# ---- backpressure ----------------------------------------------------------------------------

def test_queue_full_answers_429_with_retry_after_and_counts_it(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=2), max_queue=2)
    core = core_of(app)
    fake.push_seconds = 1.0
    leases = []
    threads = [threading.Thread(target=lambda: leases.append(core.lease("a.gguf", None, Outcome())))
               for _ in range(3)]  # one brings a, two wait for it
    for t in threads:
        t.start()
    wait_for(lambda: core.view()[0]["gates"]["waiting"].get("a.gguf") == 2)
    client = app.test_client()
    r = ask(client, "a.gguf")
    assert r.status_code == 429 and r.json["error"]["code"] == "queue_full"
    assert int(r.headers["Retry-After"]) >= 1 and r.headers["X-Cache-Action"] == "rejected"
    for t in threads:
        t.join(10)
    for lease in leases:
        lease.release()
    assert len(leases) == 3
    assert metric(client, 'store_rejections_total{code="queue_full"}') == 1


def test_queue_timeout_answers_503(tmp_path, caplog):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=2), queue_timeout_s=0.3)
    core = core_of(app)
    fake.push_seconds = 1.5
    t = threading.Thread(target=lambda: core.lease("a.gguf", None, Outcome()).release())
    t.start()
    wait_for(lambda: core.view()[0]["in_flight"])
    client = app.test_client()
    r = ask(client, "b.gguf")
    assert r.status_code == 503 and r.json["error"]["code"] == "queue_timeout"
    t.join(10)
    assert metric(client, 'store_rejections_total{code="queue_timeout"}') == 1
    assert any("queue_timeout" in rec.message for rec in caplog.records)


# ---- events and progress ---------------------------------------------------------------------

def test_events_tell_a_swap_step_by_step_with_progress(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=1), max_cache_size=3)
    core = core_of(app)
    ask(app.test_client(), "a.gguf")
    sub = core.events.subscribe()
    fake.push_seconds = 1.2
    ask(app.test_client(), "b.gguf")
    events = []
    while (event := sub.get(0.05)) is not None:
        events.append(event)
    sub.close()
    kinds = [e["event"] for e in events]
    assert kinds[0] == "transfer_started" and kinds[-1] == "loaded"
    assert kinds.index("transfer_done") < kinds.index("unloaded") < kinds.index("load_started"), kinds
    progress = [e for e in events if e["event"] == "transfer_progress"]
    assert len(progress) >= 3, "at least every 0.5 s over a 1.2 s transfer"
    stamps = [e["ts"] for e in events if e["event"] in ("transfer_started", "transfer_progress", "transfer_done")]
    assert max(b - a for a, b in zip(stamps, stamps[1:])) <= 0.5
    assert all(0 <= e["bytes_done"] <= e["bytes_total"] for e in progress)
    done = next(e for e in events if e["event"] == "transfer_done")
    assert done["gb_per_s"] >= 0 and done["bytes_total"] == progress[0]["bytes_total"]
    assert next(e for e in events if e["event"] == "loaded")["ms"] >= 0
    assert next(e for e in events if e["event"] == "unloaded")["model"] == "a.gguf"


def test_events_endpoint_streams_sse_frames(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=1), cache_policy="no-evict", max_cache_size=1)
    client = app.test_client()
    stream = client.get("/events", buffered=False)
    assert stream.mimetype == "text/event-stream"
    frames = iter(stream.response)
    assert next(frames).startswith(b": ")
    ask(client, "a.gguf")
    ask(client, "b.gguf")  # refused: cache full
    seen = []
    for frame in frames:
        text = frame.decode()
        if text.startswith("event: "):
            seen.append(json.loads(text.split("data: ", 1)[1]))
        if seen and seen[-1]["event"] == "rejected":
            break
    stream.close()
    assert seen[-1] == {**seen[-1], "event": "rejected", "model": "b.gguf", "code": "cache_full"}
    assert [e["event"] for e in seen][:3] == ["transfer_started", "transfer_done", "load_started"]


def test_models_shows_a_transfer_in_flight_with_bytes_done(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=1))
    fake.push_seconds = 1.0
    t = threading.Thread(target=lambda: ask(app.test_client(), "a.gguf"))
    t.start()
    client = app.test_client()
    wait_for(lambda: client.get("/models").json["in_flight"])
    wait_for(lambda: client.get("/models").json["in_flight"][0]["bytes_done"] > 0)
    flight = client.get("/models").json["in_flight"][0]
    assert flight["model"] == "a.gguf" and flight["op"] == "transfer"
    assert 0 < flight["bytes_done"] <= flight["bytes_total"]
    t.join(10)


def request_lines(caplog, endpoint):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"[{endpoint}] ")]


def test_streaming_openai_request_gets_progress_comments_while_it_waits(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="model_store_server.forwarding")
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=1))
    fake.push_seconds = 2.0
    r = app.test_client().post("/v1/completions", json={"model": "a.gguf", "prompt": "hi", "stream": True})
    lines = [line for line in r.get_data(as_text=True).split("\n") if line]
    r.close()
    comments = [line for line in lines if line.startswith(": ")]
    assert any(line.startswith(": transferring a.gguf... ") and line.endswith("%") for line in comments), comments
    assert any(line.startswith(": x-cache-action=load_from_store") for line in comments)
    assert lines[-1] == "data: [DONE]"
    # Its one log line is written when the swap ends, not when the waiting stream starts.
    [line] = request_lines(caplog, "/v1/completions")
    assert "model=a.gguf action=load_from_store" in line and line.endswith("loaded=[a.gguf]")


def test_streaming_openai_request_that_fails_while_waiting_gets_an_error_frame(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="model_store_server.forwarding")
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=1), cache_policy="no-evict", max_cache_size=1)
    fake.push_seconds = 1.5  # b fills the one place slowly; c waits for it, then is refused
    t2 = threading.Thread(target=lambda: ask(app.test_client(), "b.gguf"))
    t2.start()
    wait_for(lambda: core_of(app).view()[0]["in_flight"])
    r = app.test_client().post("/v1/completions", json={"model": "c.gguf", "prompt": "hi", "stream": True})
    lines = [line for line in r.get_data(as_text=True).split("\n") if line]
    r.close()
    t2.join(10)
    assert json.loads(lines[-1][6:])["error"]["code"] == "cache_full"
    [line] = request_lines(caplog, "/v1/completions")
    assert "model=c.gguf action=rejected" in line and line.endswith("error=cache_full")


def test_a_closed_bus_ends_every_stream_after_what_it_queued():
    from model_store_server.events import SUBSCRIBER_QUEUE, EventBus, sse_frames

    bus = EventBus()
    reader, flooded = bus.subscribe(), bus.subscribe()
    bus.publish("loaded", model="a.gguf")
    for _ in range(SUBSCRIBER_QUEUE - 1):  # flooded (it has "loaded" too)'s queue is full: the end still gets in, an old event goes
        flooded.queue.put_nowait({"event": "x"})
    bus.close()
    frames = list(sse_frames(reader, heartbeat_s=0.01))
    assert frames[0].startswith(": ") and frames[1].startswith("event: loaded")
    assert frames[-1] == ": the store is stopping\n\n" and len(frames) == 3
    assert list(sse_frames(flooded, heartbeat_s=0.01))[-1] == ": the store is stopping\n\n" and flooded.dropped >= 1
    late = list(sse_frames(bus.subscribe(), heartbeat_s=0.01))  # a subscriber after the close ends at once
    assert late[-1] == ": the store is stopping\n\n" and bus.subscribers() == 0
