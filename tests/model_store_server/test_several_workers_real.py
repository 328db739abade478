"""Several real workers behind one real store, on loopback with tiny models (the integration tier of
test_several_workers.py): hits stay on their worker, a store restart adopts both, a worker killed
mid-transfer fails only its request in flight and is reconciled when it returns, a burst gets a replica."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

PROMPT = {"prompt": "hello", "max_tokens": 2}


def ask(store, model, **extra):
    r = requests.post(store.url + "/user_request", json={**PROMPT, "model": model, **extra}, timeout=60)
    return r.status_code, r.headers.get("X-Cache-Action"), r.headers.get("X-Worker"), r


def workers_of(store) -> dict[str, dict]:
    return {w["name"]: w for w in requests.get(store.url + "/models", timeout=10).json()["workers"]}


def start_store(services, models, workers, extra=()):
    urls = ",".join(w.url for w in workers)
    return services.store(models, workers[0], max_cache_size=3, extra=["--worker-urls", urls, *extra])


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def kill_on_transfer(store, model, by_name, subscribed: threading.Event, done: threading.Event, killed: list):
    """Watch /events; SIGKILL the worker a transfer of `model` starts on, at once."""
    with requests.get(store.url + "/events", stream=True, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith(b": "):  # the store subscribes before its first comment: no event is missed now
                subscribed.set()
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                if event["event"] == "transfer_started" and event["model"] == model:
                    by_name[event["worker"]].stop(signal.SIGKILL)
                    killed.append(event["worker"])
                    break
            if done.is_set():
                break


def test_two_workers_keep_their_models_survive_a_store_restart_and_a_killed_worker(services, make_model, tmp_path):
    models = tmp_path / "models"
    make_model(models, "a.gguf", seed=1)
    make_model(models, "b.gguf", seed=2)
    make_model(models, "c.gguf", seed=3, size_mb=256)  # a transfer that lasts long enough to be cut
    workers = [services.worker(cache_dir=tmp_path / f"cache{i}", extra=["--max-loaded-models", "1"])
               for i in range(2)]
    store = start_store(services, models, workers, extra=["--probe-max-s", "1"])
    by_name = {f"127.0.0.1:{w.port}": w for w in workers}

    # Warm-up: each model on its own worker (b does not evict a: the empty worker starts it for less).
    home = {}
    for model in ("a.gguf", "b.gguf"):
        status, action, worker, _ = ask(store, model)
        assert (status, action) == (200, "load_from_store")
        home[model] = worker
    assert home["a.gguf"] != home["b.gguf"]
    for model in ["a.gguf", "b.gguf"] * 3:
        assert ask(store, model)[:3] == (200, "already_loaded", home[model])

    # A new store adopts both workers' disks and memories: no transfer on the next requests.
    store.stop()
    store = start_store(services, models, workers, extra=["--probe-max-s", "1"])
    for model in ["a.gguf", "b.gguf"] * 2:
        assert ask(store, model)[:3] == (200, "already_loaded", home[model])

    # kill -9 the worker a transfer of c goes to, while it goes: that request fails with a code...
    subscribed, done, killed = threading.Event(), threading.Event(), []
    watcher = threading.Thread(target=kill_on_transfer, args=(store, "c.gguf", by_name, subscribed, done, killed),
                               daemon=True)
    watcher.start()
    assert subscribed.wait(30), "the watcher did not get the store's first /events frame"
    status, _, _, r = ask(store, "c.gguf")
    done.set()
    watcher.join(10)
    [dead] = killed
    assert (status, r.json()["error"]["code"]) == (502, "worker_unavailable")
    # ... and the next ones, for every model, are served by the other worker.
    alive = next(name for name in by_name if name != dead)
    for model in ("a.gguf", "b.gguf", "c.gguf"):
        status, _, worker, r = ask(store, model)
        assert (status, worker) == (200, alive), r.text
    assert workers_of(store)[dead]["health"]["up"] is False

    # The killed worker comes back empty in memory: the store probes, reconciles, and nobody's request fails.
    victim = by_name[dead]
    victim.start()
    wait_for(lambda: workers_of(store)[dead]["health"]["up"])
    view = workers_of(store)[dead]
    assert view["loaded"] == [] and view["stale"] is False
    on_disk = sorted(p.name for p in victim.cache_dir.iterdir())
    assert not [n for n in on_disk if n.startswith(".incoming-")]  # the cut transfer left nothing behind
    assert sorted(view["cached"]) == on_disk == sorted(view["report"]["cached"])
    for model in ["a.gguf", "b.gguf", "c.gguf"] * 2:
        assert ask(store, model)[0] == 200
    log = store.log()
    assert f"worker {dead} is down" in log and f"worker {dead} answers again" in log


def test_a_burst_on_one_model_places_a_second_replica_then_the_copies_leave(services, make_model, tmp_path):
    models = tmp_path / "models"
    make_model(models, "a.gguf", seed=1)
    # One stream at a time per model (N_PARALLEL=1): the queue that calls for a replica builds at once.
    workers = [services.worker(cache_dir=tmp_path / f"cache{i}",
                               extra=["--max-loaded-models", "1", "--n-parallel", "1"]) for i in range(3)]
    store = start_store(services, models, workers, extra=["--keep-alive-seconds", "3"])
    slow = {"max_tokens": 200}
    first = ask(store, "a.gguf", **slow)
    assert first[0] == 200  # measured: how long one generation of a takes
    # 16 clients, each asking three times in a row: the first wave queues and calls for the copy,
    # the later ones find both copies resident (a single wave can be over before the copy is).
    with ThreadPoolExecutor(16) as pool:
        answers = [a for wave in pool.map(lambda _: [ask(store, "a.gguf", **slow) for _ in range(3)], range(16))
                   for a in wave]
    assert all(a[0] == 200 for a in answers), [a[3].text for a in answers if a[0] != 200]
    used = [a[2] for a in answers]
    assert len(set(used)) == 2, used  # a second copy, not a third (MAX_REPLICAS=2)
    assert min(used.count(w) for w in set(used)) >= 2, used  # requests spread over both
    assert "placement=replica" in store.log()
    # Demand falls: the keep-alive unloads the copies like any idle model.
    wait_for(lambda: not any(w["loaded"] for w in workers_of(store).values()), timeout=20)
