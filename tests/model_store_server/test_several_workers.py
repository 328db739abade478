"""Several workers behind one store, over FakeWorkers (a fast seam; test_several_workers_real.py is the
integration tier): placement by locality, failover and probes, replicas, per-worker views and controls."""

from __future__ import annotations

import json
import logging
import threading
import time

from model_store_server.config import StoreConfig
from model_store_server.core import build_core
from model_store_server.events import sse_frames
from model_store_server.outcome import Outcome
from model_store_server.worker_client import WorkerUnavailable
from model_store_server.workers_config import WorkerSpec
from tests.support.fake_worker import FakeWorker
from tests.support.store_harness import PROMPT, ask, core_of, fake_workers_store, wait_for


def test_two_models_alternate_as_hits_each_on_its_own_worker(tmp_path, caplog):
    fakes = [FakeWorker(max_loaded=1), FakeWorker(max_loaded=1)]
    client = fake_workers_store(tmp_path, fakes).test_client()
    with caplog.at_level(logging.INFO, logger="model_store_server.forwarding"):
        first, second = ask(client, "a.gguf"), ask(client, "b.gguf")
    lines = [r.message for r in caplog.records if r.message.startswith("[/user_request]")]
    assert [f"worker={first.headers['X-Worker']} placement=cheapest_start" in lines[0],
            f"worker={second.headers['X-Worker']} placement=cheapest_start" in lines[1]] == [True, True]
    assert (first.headers["X-Cache-Action"], second.headers["X-Cache-Action"]) == ("load_from_store",) * 2
    # b does not evict a: the other worker starts it for less.
    assert first.headers["X-Worker"] != second.headers["X-Worker"]
    home = {"a.gguf": first.headers["X-Worker"], "b.gguf": second.headers["X-Worker"]}
    for model in ["a.gguf", "b.gguf"] * 3:
        r = ask(client, model)
        assert (r.status_code, r.headers["X-Cache-Action"], r.headers["X-Worker"]) == (200, "already_loaded",
                                                                                       home[model])
    assert sorted(list(f.loaded) for f in fakes) == [["a.gguf"], ["b.gguf"]]
    assert sum(f.receives for f in fakes) == 2


def test_a_down_worker_is_skipped_probed_and_reconciled_when_it_restarts(tmp_path, caplog):
    fakes = [FakeWorker(max_loaded=1), FakeWorker(max_loaded=1)]
    app = fake_workers_store(tmp_path, fakes)
    client, core = app.test_client(), core_of(app)
    home = ask(client, "a.gguf").headers["X-Worker"]
    down, other = (fakes[0], fakes[1]) if home == "w0" else (fakes[1], fakes[0])
    down.up = False
    # The next request for a finds its worker gone before anything was done there: placed elsewhere.
    r = ask(client, "a.gguf")
    assert (r.status_code, r.headers["X-Cache-Action"], r.headers["X-Worker"]) == (
        200, "load_from_store", "w1" if home == "w0" else "w0")
    view = {w["name"]: w for w in client.get("/models").get_json()["workers"]}
    assert view[home]["health"]["up"] is False and view[home]["health"]["downs"] == 1
    assert f'store_worker_up{{worker="{home}"}} 0.0' in client.get("/metrics").get_data(as_text=True)
    health = client.get("/health").get_json()
    assert health["worker"] == "unreachable" and [w["up"] for w in health["workers"]].count(False) == 1
    # It comes back as a new process with an empty memory: a probe reconciles it, nobody's request fails.
    down.restart()
    down.up = True
    wait_for(lambda: all(s.health.up for s in core.slots))
    assert not core.slot_named(home).belief.resident()
    assert f'store_worker_up{{worker="{home}"}} 1.0' in client.get("/metrics").get_data(as_text=True)
    assert ask(client, "a.gguf").headers["X-Worker"] != home  # the copy it has stays in use
    assert other.loaded and "a.gguf" in other.loaded


def test_no_worker_up_is_a_502_with_a_code(tmp_path):
    fakes = [FakeWorker(), FakeWorker()]
    app = fake_workers_store(tmp_path, fakes)
    for fake in fakes:
        fake.up = False
    r = ask(app.test_client(), "a.gguf")
    assert (r.status_code, r.get_json()["error"]["code"]) == (502, "worker_unavailable")


def _three_workers_that_measured_a(tmp_path, n_parallel: int = 1):
    """(app, fakes, core): three workers, replicas capped at 2, and one 50 ms generation of a measured."""
    fakes = [FakeWorker(max_loaded=1, n_parallel=n_parallel) for _ in range(3)]
    app = fake_workers_store(tmp_path, fakes, max_replicas=2)
    core = core_of(app)
    first = core.lease("a.gguf", None, Outcome())
    time.sleep(0.05)  # a generation of a takes 50 ms: the store measures it
    first.release()
    return app, fakes, core


def _lease_a(core, count: int) -> tuple[list, list[Outcome]]:
    """`count` leases of a held at once (released by the caller), and their outcomes."""
    outcomes = [Outcome() for _ in range(count)]
    return [core.lease("a.gguf", None, o) for o in outcomes], outcomes


def test_a_long_queue_places_a_second_replica_and_spreads_requests(tmp_path):
    _, fakes, core = _three_workers_that_measured_a(tmp_path)
    held, outcomes = _lease_a(core, 6)
    workers = [o.worker for o in outcomes]
    assert [o.placement for o in outcomes].count("replica") == 1
    assert len(set(workers)) == 2, workers  # the cap: two copies, never three
    assert min(workers.count(w) for w in set(workers)) >= 2  # spread over both
    assert sum("a.gguf" in f.loaded for f in fakes) == 2
    for lease in held:
        lease.release()


def test_no_replica_while_the_worker_has_a_free_slot(tmp_path):
    """The slots come from the worker's listing (n_parallel): three streams on four slots wait for nothing."""
    _, fakes, core = _three_workers_that_measured_a(tmp_path, n_parallel=4)
    held, outcomes = _lease_a(core, 5)
    placements = [o.placement for o in outcomes]
    assert placements[:4] == ["resident"] * 4, placements  # uses 0..3 of 4 slots: no wait
    assert placements[4] == "replica", placements  # all four busy: a copy elsewhere starts sooner
    assert sum("a.gguf" in f.loaded for f in fakes) == 2
    for lease in held:
        lease.release()


def test_ollama_ps_lists_a_model_once_however_many_workers_hold_it(tmp_path):
    app, fakes, core = _three_workers_that_measured_a(tmp_path)
    held, _ = _lease_a(core, 6)  # a queue: a replica
    for lease in held:
        lease.release()
    assert sum("a.gguf" in f.loaded for f in fakes) == 2
    client = app.test_client()
    for worker in ("w0", "w1"):  # b on two disks
        assert client.post("/admin/prefetch", json={"model": "b.gguf", "worker": worker}).status_code == 200
    ps = client.get("/api/ps").get_json()
    assert [(m["name"], m["replicas"]) for m in ps["models"]] == [("a.gguf", 2)]
    assert [m["name"] for m in ps["on_disk"]] == ["b.gguf"]


def test_store_restart_adopts_every_worker(tmp_path):
    fakes = [FakeWorker(max_loaded=1), FakeWorker(max_loaded=1)]
    client = fake_workers_store(tmp_path / "one", fakes).test_client()
    home = {m: ask(client, m).headers["X-Worker"] for m in ("a.gguf", "b.gguf")}
    again = fake_workers_store(tmp_path / "one", fakes).test_client()  # a new store over the same workers
    for model in ["a.gguf", "b.gguf", "a.gguf"]:
        r = ask(again, model)
        assert (r.headers["X-Cache-Action"], r.headers["X-Worker"]) == ("already_loaded", home[model])
    assert sum(f.receives for f in fakes) == 2


def test_views_and_controls_take_a_worker(tmp_path):
    fakes = [FakeWorker(max_loaded=1), FakeWorker(max_loaded=1)]
    app = fake_workers_store(tmp_path, fakes)
    client = app.test_client()
    home = {m: ask(client, m).headers["X-Worker"] for m in ("a.gguf", "b.gguf")}
    listing = client.get("/models", query_string={"worker": home["b.gguf"]}).get_json()
    assert listing["policy"]["loaded"] == ["b.gguf"] and listing["worker"]["name"] == home["b.gguf"]
    assert [w["name"] for w in listing["workers"]] == ["w0", "w1"]
    assert client.get("/models").get_json()["worker"]["name"] == "w0"  # the one-worker shape: the first
    r = client.get("/models", query_string={"worker": "nope"})
    assert (r.status_code, r.get_json()["error"]["code"]) == (404, "unknown_worker")
    # Unloading on a worker that does not hold the model changes nothing; on its own worker it unloads.
    r = client.post("/admin/unload", json={"model": "a.gguf", "worker": home["b.gguf"]})
    assert r.get_json()["unloaded"] == []
    r = client.post("/admin/unload", json={"model": "a.gguf"})
    assert (r.get_json()["unloaded"], r.get_json()["worker"]) == (["a.gguf"], home["a.gguf"])
    r = client.post("/admin/prefetch", json={"model": "c.gguf", "worker": home["b.gguf"]})
    assert r.get_json()["worker"] == home["b.gguf"]
    assert client.post("/admin/reset", json={"worker": "nope"}).status_code == 404
    r = client.post("/admin/reset", json={"worker": home["b.gguf"]})
    assert sorted(r.get_json()["deleted"]) == ["b.gguf", "c.gguf"]
    assert [f.disk for f in fakes].count({}) == 1
    metrics = client.get("/metrics").get_data(as_text=True)
    assert f'store_worker_requests_total{{action="load_from_store",worker="{home["a.gguf"]}"}} 1.0' in metrics


def test_events_can_be_read_for_one_worker(tmp_path):
    fakes = [FakeWorker(max_loaded=1), FakeWorker(max_loaded=1)]
    app = fake_workers_store(tmp_path, fakes)
    core, client = core_of(app), app.test_client()
    sub = core.events.subscribe()
    frames = sse_frames(sub, heartbeat_s=0.05, worker="w1")
    next(frames)  # the opening comment
    home = {m: ask(client, m).headers["X-Worker"] for m in ("a.gguf", "b.gguf")}
    seen = []
    for frame in frames:
        if frame.startswith(": ping"):
            break
        seen.append(json.loads(frame.split("data: ", 1)[1]))
    frames.close()
    assert seen and {e["worker"] for e in seen} == {"w1"}
    assert {e["model"] for e in seen if e["event"] == "loaded"} == {m for m, w in home.items() if w == "w1"}


def test_concurrent_first_requests_bring_one_copy(tmp_path):
    fakes = [FakeWorker(max_loaded=1) for _ in range(3)]
    for fake in fakes:
        fake.push_seconds = 0.05
    core = core_of(fake_workers_store(tmp_path, fakes))
    results = []

    def go():
        outcome = Outcome()
        core.lease("a.gguf", None, outcome).release()
        results.append(outcome.worker)

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and sum(f.receives for f in fakes) == 1


def test_each_worker_has_its_own_client_and_rdma_sender(tmp_path):
    workers = (WorkerSpec("gpu1", "http://gpu1:8080", rdma_host="10.0.0.1", rdma_port=9001),
               WorkerSpec("gpu2", "http://gpu2:8080"))
    core = build_core(StoreConfig(models_dir=tmp_path, workers=workers, transport="rdma", worker_rdma_port=8500))
    clients = [s.client for s in core.slots]
    senders = [s.executor.transport for s in core.slots]
    assert [c.base_url for c in clients] == ["http://gpu1:8080", "http://gpu2:8080"]
    assert clients[0]._session is not clients[1]._session  # a connection pool each
    assert [(t.name, t.host, t.port) for t in senders] == [("rdma", "10.0.0.1", 9001), ("rdma", "localhost", 8500)]


def test_a_store_starts_with_a_worker_down_and_takes_it_in_when_it_answers(tmp_path):
    fakes = [FakeWorker(max_loaded=1), FakeWorker(max_loaded=1)]
    fakes[0].up = False
    app = fake_workers_store(tmp_path, fakes)
    core, client = core_of(app), app.test_client()
    assert [s.health.up for s in core.slots] == [False, True]
    assert {ask(client, m).headers["X-Worker"] for m in ("a.gguf", "b.gguf")} == {"w1"}
    fakes[0].up = True
    wait_for(lambda: core.slots[0].health.up)
    assert ask(client, "c.gguf").headers["X-Worker"] == "w0"  # the empty worker starts c for least


def test_a_request_whose_transfer_met_a_dead_worker_fails_and_the_next_goes_elsewhere(tmp_path):
    fakes = [FakeWorker(max_loaded=1), FakeWorker(max_loaded=1)]
    app = fake_workers_store(tmp_path, fakes)
    client = app.test_client()
    fakes[0].fail_next("push", WorkerUnavailable("worker at fake unreachable: ConnectionError"))
    r = ask(client, "a.gguf")  # placed on w0 (the tie goes to the first name); its transfer breaks off
    assert (r.status_code, r.get_json()["error"]["code"]) == (502, "worker_unavailable")
    assert (r.headers["X-Cache-Action"], r.headers["X-Worker"]) == ("load_from_store", "w0")
    assert core_of(app).slots[0].health.up is False
    r = ask(client, "a.gguf")
    assert (r.status_code, r.headers["X-Worker"]) == (200, "w1")
