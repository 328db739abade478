"""The store's two tiers and its gates over a FakeWorker (a fast seam; the real-service tests are the
integration tier): memory LRU, drains instead of cut-offs, no head-of-line blocking, the swap bound,
headers and log lines, and what happens when the worker fails or restarts."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from model_store_server.outcome import Outcome
from tests.support.fake_worker import FakeWorker, worker_error
from tests.support.store_harness import PROMPT, ask, core_of, fake_store, wait_for, write_models


def names(header: str | None) -> list[str]:
    return [n for n in (header or "").split(",") if n]


def lease_in_thread(core, model, results):
    """Take a lease in a thread; the lease (or the error) lands in results[model]."""
    def run():
        try:
            results[model] = core.lease(model, None, Outcome())
        except Exception as err:  # handed to the test
            results[model] = err
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.fixture
def two_resident(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=2), max_cache_size=3)
    return app, fake


def test_two_resident_models_alternate_as_hits(two_resident):
    app, fake = two_resident
    client = app.test_client()
    assert ask(client, "a.gguf").headers["X-Cache-Action"] == "load_from_store"
    assert ask(client, "b.gguf").headers["X-Cache-Action"] == "load_from_store"
    for model in ["a.gguf", "b.gguf"] * 3:
        r = ask(client, model)
        assert r.status_code == 200 and r.headers["X-Cache-Action"] == "already_loaded"
        assert r.data.startswith(f"[{model}]".encode())
    assert fake.changes() == ["push a.gguf", "load a.gguf", "push b.gguf", "load b.gguf"]


def test_a_third_model_unloads_the_least_recently_used(two_resident, caplog):
    app, fake = two_resident
    client = app.test_client()
    for model in ["a.gguf", "b.gguf", "a.gguf"]:
        ask(client, model)
    with caplog.at_level(logging.INFO, logger="model_store_server.forwarding"):
        r = ask(client, "c.gguf")
    assert r.headers["X-Cache-Action"] == "load_from_store"
    assert names(r.headers["X-Cache-Unloaded"]) == ["b.gguf"] and names(r.headers["X-Cache-Evicted"]) == []
    assert sorted(fake.loaded) == ["a.gguf", "c.gguf"] and sorted(fake.disk) == ["a.gguf", "b.gguf", "c.gguf"]
    line = [r.message for r in caplog.records if r.message.startswith("[/user_request]")][-1]
    assert "model=c.gguf action=load_from_store" in line
    assert "unloaded=[b.gguf] loaded=[a.gguf, c.gguf]" in line
    assert ask(client, "b.gguf").headers["X-Cache-Action"] == "load_from_local_store"


def test_a_request_for_a_resident_model_does_not_wait_for_another_models_transfer(tmp_path):
    """b's push is held until the test lets it go, so a's request meets it running on any machine."""
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=2), max_cache_size=3)
    core = core_of(app)
    core.lease("a.gguf", None, Outcome()).release()
    fake.hold_pushes()
    results: dict = {}
    t = lease_in_thread(core, "b.gguf", results)
    try:
        wait_for(lambda: core.view()[0]["in_flight"])  # b's transfer has started, and stays until released
        a_results: dict = {}
        lease_in_thread(core, "a.gguf", a_results)
        wait_for(lambda: "a.gguf" in a_results, 10.0)  # behind b's transfer it would wait until the release
        assert "b.gguf" not in results and core.view()[0]["in_flight"], "a was served while b's push was held"
        a_results["a.gguf"].release()
    finally:
        fake.release_pushes()
    t.join(10)
    results["b.gguf"].release()


def test_a_busy_model_is_not_unloaded_the_swap_waits_for_its_stream(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=1), max_cache_size=3, max_swap_wait_ms=0)
    core = core_of(app)
    held = core.lease("a.gguf", None, Outcome())
    results: dict = {}
    t = lease_in_thread(core, "b.gguf", results)
    wait_for(lambda: "push b.gguf" in fake.calls)
    time.sleep(0.1)
    assert "unload a.gguf" not in fake.calls and "b.gguf" not in results
    # With no overtaking allowed, a request for a that arrives after the swap waits behind it.
    later: dict = {}
    t2 = lease_in_thread(core, "a.gguf", later)
    time.sleep(0.1)
    assert "a.gguf" not in later
    held.release()
    t.join(5)
    assert fake.changes()[-2:] == ["unload a.gguf", "load b.gguf"]
    results["b.gguf"].release()
    t2.join(5)
    later["a.gguf"].release()
    assert fake.changes()[-2:] == ["unload b.gguf", "load a.gguf"]


def test_requests_for_a_victim_overtake_a_waiting_swap_only_within_the_bound(tmp_path):
    bound_ms = 600
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=1), max_cache_size=3, max_swap_wait_ms=bound_ms)
    core = core_of(app)
    first = core.lease("a.gguf", None, Outcome())
    results: dict = {}
    swap = lease_in_thread(core, "b.gguf", results)
    wait_for(lambda: "push b.gguf" in fake.calls)
    overtaking = Outcome()
    core.lease("a.gguf", None, overtaking).release()  # within the bound: served at once
    assert overtaking.action == "already_loaded"
    time.sleep(bound_ms / 1000 + 0.2)
    late: dict = {}
    t = lease_in_thread(core, "a.gguf", late)  # past the bound: waits behind the swap
    time.sleep(0.15)
    assert "a.gguf" not in late and "b.gguf" not in results
    first.release()
    swap.join(5)
    assert fake.changes()[-1] == "load b.gguf"
    results["b.gguf"].release()
    t.join(5)
    late["a.gguf"].release()


def test_a_swap_behind_a_stream_of_overlapping_requests_does_not_starve(tmp_path):
    """The test keeps a busy itself: each new lease on a is taken before the previous one is let go, so a
    is never idle; within the bound they overtake the swap, then a's gate closes, they drain, and b loads."""
    bound_s = 0.2
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=1), max_cache_size=3, max_swap_wait_ms=int(bound_s * 1000))
    core = core_of(app)
    held = [core.lease("a.gguf", None, Outcome())]
    swap: dict = {}

    def ask_b():
        started = time.monotonic()
        swap["lease"] = core.lease("b.gguf", None, Outcome())
        swap["waited"] = time.monotonic() - started

    t = threading.Thread(target=ask_b, daemon=True)
    t.start()
    closed = lambda: "a.gguf" in core.view()[0]["gates"]["closed"]  # noqa: E731
    overtook, waiter, deadline = 0, None, time.monotonic() + 10
    while not closed():
        assert time.monotonic() < deadline, "requests for a kept overtaking: the swap to b starved"
        got: dict = {}
        thread = lease_in_thread(core, "a.gguf", got)
        wait_for(lambda: "a.gguf" in got or closed(), 10.0)
        if "a.gguf" in got:  # the new use began before the old one ends: a is never idle
            held.append(got["a.gguf"])
            held.pop(0).release()
            overtook += 1
        else:
            waiter = (thread, got)
        time.sleep(0.01)
    assert "lease" not in swap and overtook >= 1
    for lease in held:
        lease.release()
    t.join(10)
    assert swap["waited"] >= bound_s, "a was busy throughout: the swap had to use its bound"
    assert fake.changes()[-1] == "load b.gguf"
    swap["lease"].release()
    if waiter is not None:  # a request for a that came after the gate closed waited behind the swap; now served
        waiter[0].join(10)
        waiter[1]["a.gguf"].release()


def test_worker_refusing_for_memory_makes_the_store_unload_more(tmp_path):
    # The worker needs twice the file size; the store guesses the file size until told otherwise.
    fake = FakeWorker(max_loaded=3, budget_bytes=13_000, memory_of=lambda name, size: 2 * size)
    app, fake = fake_store(tmp_path, fake, max_cache_size=3)
    client = app.test_client()
    assert ask(client, "a.gguf").status_code == 200
    r = ask(client, "b.gguf")
    assert r.status_code == 200 and names(r.headers["X-Cache-Unloaded"]) == ["a.gguf"]
    assert "refuse b.gguf" in fake.calls and list(fake.loaded) == ["b.gguf"]
    r = ask(client, "a.gguf")  # now the store knows: it unloads b before asking
    assert names(r.headers["X-Cache-Unloaded"]) == ["b.gguf"]
    assert fake.calls.count("refuse a.gguf") == 0


def test_the_workers_estimate_in_a_refusal_sizes_the_next_plan(tmp_path):
    # d needs four times its file size (its settings, say); the worker's 507 says how much: the store
    # frees that much at once instead of one model per refusal.
    fake = FakeWorker(max_loaded=4, budget_bytes=20_000,
                      memory_of=lambda name, size: 4 * size if name == "d.gguf" else size)
    app, fake = fake_store(tmp_path, fake, models=("a.gguf", "b.gguf", "c.gguf", "d.gguf"), max_cache_size=4)
    client = app.test_client()
    for model in ("a.gguf", "b.gguf", "c.gguf"):
        assert ask(client, model).status_code == 200
    r = ask(client, "d.gguf")
    assert r.status_code == 200 and names(r.headers["X-Cache-Unloaded"]) == ["a.gguf", "b.gguf", "c.gguf"]
    assert fake.calls.count("refuse d.gguf") == 1 and list(fake.loaded) == ["d.gguf"]


def test_pinned_models_fill_memory_then_other_requests_are_refused_with_507(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=1), max_cache_size=3, pinned_models=("a.gguf",))
    client = app.test_client()
    wait_for(lambda: "a.gguf" in fake.loaded)  # pinned models are loaded at start
    r = ask(client, "b.gguf")
    assert r.status_code == 507 and r.json["error"]["code"] == "insufficient_memory"
    assert r.headers["X-Cache-Action"] == "rejected"
    assert list(fake.loaded) == ["a.gguf"]


def test_worker_restart_is_noticed_and_the_request_retried(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=2), max_cache_size=3)
    client = app.test_client()
    ask(client, "a.gguf")
    fake.restart()  # the store does not see it: it still believes a is loaded
    r = ask(client, "a.gguf")
    assert r.status_code == 200 and r.headers["X-Cache-Action"] == "load_from_local_store"
    assert fake.receives == 1


def test_restart_seen_through_the_boot_id_before_a_change(tmp_path, caplog):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=2), max_cache_size=3)
    client = app.test_client()
    ask(client, "a.gguf")
    ask(client, "b.gguf")
    fake.restart()
    fake.disk.pop("b.gguf")  # and b's file went with it
    with caplog.at_level(logging.INFO):
        r = ask(client, "c.gguf")
    assert r.status_code == 200
    assert any("restarted" in rec.message for rec in caplog.records)
    core = core_of(app)
    assert sorted(core.view()[0]["cached"]) == sorted(fake.disk) == ["a.gguf", "c.gguf"]
    assert [m["name"] for m in core.view()[0]["loaded"]] == list(fake.loaded) == ["c.gguf"]


def test_a_model_the_worker_cannot_load_is_removed_and_the_error_reported(tmp_path, caplog):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=2))
    client = app.test_client()
    fake.fail_next("load", worker_error(422, "load_failed", "llama.cpp could not load a.gguf"))
    with caplog.at_level(logging.INFO, logger="model_store_server.forwarding"):
        r = ask(client, "a.gguf")
    assert r.status_code == 502 and r.json["error"]["code"] == "load_failed"
    assert r.headers["X-Cache-Action"] == "load_from_store"
    assert "a.gguf" not in fake.disk and core_of(app).view()[0]["cached"] == []
    lines = [rec.message for rec in caplog.records if rec.message.startswith("[/user_request]")]
    assert len(lines) == 1 and "error=load_failed" in lines[0]
    assert ask(client, "a.gguf").status_code == 200  # and the next request sends it again


def test_every_request_gets_one_log_line_even_a_404(tmp_path, caplog):
    app, _ = fake_store(tmp_path)
    with caplog.at_level(logging.INFO, logger="model_store_server.forwarding"):
        r = ask(app.test_client(), "missing.gguf")
    assert r.status_code == 404 and "X-Cache-Action" not in r.headers
    lines = [rec.message for rec in caplog.records if rec.message.startswith("[/user_request]")]
    assert len(lines) == 1 and "action=none" in lines[0] and "error=model_not_found" in lines[0]


def test_cache_full_is_rejected_with_headers_and_no_transfer(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=1), cache_policy="no-evict", max_cache_size=2)
    client = app.test_client()
    ask(client, "a.gguf")
    ask(client, "b.gguf")
    r = ask(client, "c.gguf")
    assert r.status_code == 503 and r.json["error"]["code"] == "cache_full"
    assert r.headers["X-Cache-Action"] == "rejected" and fake.receives == 2


def test_a_model_changed_in_the_store_is_replaced_even_while_resident(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=2))
    client = app.test_client()
    ask(client, "a.gguf")
    write_models(core_of(app).catalog.root, ["a.gguf"])  # new bytes under the same name
    r = ask(client, "a.gguf")
    assert r.headers["X-Cache-Action"] == "load_from_store"
    assert fake.changes()[-4:] == ["unload a.gguf", "delete a.gguf", "push a.gguf", "load a.gguf"]


def test_mixed_load_keeps_belief_and_worker_equal(tmp_path):
    fake = FakeWorker(max_loaded=2)
    app, fake = fake_store(tmp_path, fake, max_cache_size=2, max_swap_wait_ms=50)
    core = core_of(app)
    models = ["a.gguf", "b.gguf", "c.gguf"]
    errors, actions = [], []

    def client(i):
        for j in range(30):
            outcome = Outcome()
            try:
                lease = core.lease(models[(i + j) % 3], None, outcome)
            except Exception as err:
                errors.append(err)
                continue
            time.sleep(0.001)
            lease.release()
            actions.append(outcome.action)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(actions) == 16 * 30
    view = core.view()[0]
    assert sorted(view["cached"]) == sorted(fake.disk)
    assert sorted(m["name"] for m in view["loaded"]) == sorted(fake.loaded)
    pushes = actions.count("load_from_store")
    assert fake.receives == pushes, "one transfer per admission, never two for one miss"


def test_a_restarted_store_adopts_the_workers_disk_and_memory(tmp_path):
    app, fake = fake_store(tmp_path, FakeWorker(max_loaded=2), max_cache_size=3)
    client = app.test_client()
    ask(client, "a.gguf")
    ask(client, "b.gguf")
    again, _ = fake_store(tmp_path, fake, models_dir=core_of(app).catalog.root, max_cache_size=3)
    client = again.test_client()
    assert [ask(client, m).headers["X-Cache-Action"] for m in ("a.gguf", "b.gguf")] == ["already_loaded"] * 2
    assert fake.receives == 2 and sorted(fake.loaded) == ["a.gguf", "b.gguf"]
