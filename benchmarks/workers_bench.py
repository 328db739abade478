"""Several workers behind one store: its placement cost with many workers, and a soak with a restart.

    python benchmarks/workers_bench.py overhead [--workers 8] [--requests 200]
    python benchmarks/workers_bench.py soak [--workers 3] [--models 5] [--clients 32] [--seconds 60]

overhead  N real workers on loopback, one tiny model resident on each (warmed through the store),
          then --requests already_loaded requests, one at a time, spread over the models: the store's
          placement time (X-Placement-Ms) and plan time (X-Decision-Ms), median and p95, and the
          per-request overhead: median latency through the store minus median latency asking the
          worker's /infer directly for the same generation, measured in the same run; the same again
          with a store over only one of those workers, as the baseline the ratio is taken against.
soak      N workers, M tiny models, C clients each asking for a random model for --seconds; halfway,
          one worker is killed (SIGKILL) and started again with its cache. Counts requests by outcome
          and error code, the 502s (and broken streams) of requests that were on the killed worker,
          the time until the store uses it again, and whether the store's view of every worker equals
          the worker's own listing at the end.

Tiny generated models (inference_worker.testing.tiny_gguf) keep the machine's cores for the store
and the workers' HTTP; generation itself is a few milliseconds. Timings vary with the machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from inference_worker.testing.tiny_gguf import write_tiny_gguf  # noqa: E402
from model_swap.testing import ServiceProcess  # noqa: E402

log = logging.getLogger("workers_bench")
PROMPT = "Name three colours."


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))] if values else float("nan")


def start_workers(work: Path, n: int, max_loaded: int = 1) -> list[ServiceProcess]:
    workers = []
    for i in range(n):
        svc = ServiceProcess("inference_worker", ["--cache-dir", str(work / f"cache{i}"), "--max-loaded-models",
                                                  str(max_loaded), "--n-threads", "1", "--threads", "16"],
                             work / f"worker{i}.log")
        svc.cache_dir = work / f"cache{i}"
        workers.append(svc.start())
    return workers


def start_store(work: Path, models: Path, workers: list[ServiceProcess], tag: str, *extra: str) -> ServiceProcess:
    args = ["--models-dir", str(models), "--worker-urls", ",".join(w.url for w in workers), "--max-cache-size", "3",
            "--probe-max-s", "2", *extra]
    return ServiceProcess("model_store_server", args, work / f"store-{tag}.log").start()


def write_models(directory: Path, n: int) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"tiny{i}.gguf" for i in range(n)]
    for i, name in enumerate(names):
        write_tiny_gguf(directory / name, seed=100 + i)
    return names


def timed_post(url: str, body: dict) -> tuple[float, requests.Response]:
    started = time.perf_counter()
    r = requests.post(url, json=body, timeout=120)
    return time.perf_counter() - started, r


def measure_overhead(store: ServiceProcess, names: list[str], home: dict[str, str], urls: dict[str, str],
                     count: int) -> dict:
    """Already-loaded requests through the store, and the same generations asked of the worker directly."""
    through, direct, placement, decision = [], [], [], []
    for i in range(count):
        model = names[i % len(names)]
        body = {"prompt": PROMPT, "model": model, "max_tokens": 1, "temperature": 0, "seed": 1}
        seconds, r = timed_post(store.url + "/user_request", body)
        assert r.status_code == 200 and r.headers["X-Cache-Action"] == "already_loaded", (r.status_code, r.text)
        through.append(seconds)
        placement.append(float(r.headers["X-Placement-Ms"]))
        decision.append(float(r.headers["X-Decision-Ms"]))
        seconds, r = timed_post(urls[home[model]] + "/infer", body)
        assert r.status_code == 200, r.text
        direct.append(seconds)
    return {"through_ms": statistics.median(through) * 1000, "direct_ms": statistics.median(direct) * 1000,
            "placement_ms": statistics.median(placement), "placement_p95_ms": pct(placement, 95),
            "decision_ms": statistics.median(decision)}


def run_overhead(args, work: Path) -> None:
    names = write_models(work / "models", args.workers)
    workers = start_workers(work, args.workers)
    results = {}
    try:
        for label, chosen in ((f"{args.workers} workers", workers), ("1 worker", workers[:1])):
            store = start_store(work, work / "models", chosen, label.replace(" ", "-"))
            try:
                models = names if len(chosen) > 1 else names[:1]
                home = {}
                for model in models:  # warm: one model resident on each worker
                    r = requests.post(store.url + "/user_request", json={"prompt": PROMPT, "model": model,
                                                                         "max_tokens": 1}, timeout=120)
                    assert r.status_code == 200, r.text
                    home[model] = r.headers["X-Worker"]
                urls = {f"127.0.0.1:{w.port}": w.url for w in chosen}
                results[label] = measure_overhead(store, models, home, urls, args.requests)
                results[label]["workers used"] = len(set(home.values()))
            finally:
                store.stop()
    finally:
        for w in workers:
            w.stop()
    base = results["1 worker"]
    log.info("%-10s %10s %10s %12s %12s %14s %12s %14s", "store over", "placement", "p95", "plan (ms)",
             "via store", "worker direct", "overhead", "vs 1 worker")
    for label, r in results.items():
        overhead = r["through_ms"] - r["direct_ms"]
        ratio = overhead / max(1e-9, base["through_ms"] - base["direct_ms"])
        log.info("%-10s %10.3f %10.3f %12.3f %12.2f %14.2f %12.2f %13.2fx", label, r["placement_ms"],
                 r["placement_p95_ms"], r["decision_ms"], r["through_ms"], r["direct_ms"], overhead, ratio)


def run_soak(args, work: Path) -> None:
    names = write_models(work / "models", args.models)
    workers = start_workers(work, args.workers, max_loaded=2)
    store = start_store(work, work / "models", workers, "soak", "--keep-alive-seconds", "10")
    try:
        by_name = {f"127.0.0.1:{w.port}": w for w in workers}
        victim_name = next(iter(by_name))
        victim = by_name[victim_name]
        outcomes: Counter[str] = Counter()
        on_victim: Counter[str] = Counter()
        lock = threading.Lock()
        stop_at = time.monotonic() + args.seconds
        killed = threading.Event()
        back_at: list[float] = []
        served_after: Counter[str] = Counter()
        rng = random.Random(args.seed)

        def client(seed: int) -> None:
            mine = random.Random(seed)
            while time.monotonic() < stop_at:
                model = mine.choice(names)
                body = {"prompt": PROMPT, "model": model, "max_tokens": args.max_tokens}
                try:
                    r = requests.post(store.url + "/user_request", json=body, timeout=120, stream=True)
                    text = b"".join(r.iter_content(None))
                    key = "ok" if r.status_code == 200 and text else f"{r.status_code} " + (
                        "empty" if r.status_code == 200 else json.loads(text)["error"]["code"])
                    worker = r.headers.get("X-Worker")
                except (requests.RequestException, ValueError, KeyError) as err:
                    key, worker = f"broken ({type(err).__name__})", None
                with lock:
                    outcomes[key] += 1
                    if back_at and time.monotonic() > back_at[0] and worker:
                        served_after[worker] += 1
                    if key != "ok" and killed.is_set() and worker in (victim_name, None):
                        on_victim[key] += 1

        threads = [threading.Thread(target=client, args=(rng.random(),), daemon=True) for _ in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(args.seconds / 2)
        log.info("killing %s (SIGKILL) and starting it again", victim_name)
        killed.set()
        victim.stop(signal.SIGKILL)
        victim.start()
        restarted = time.monotonic()
        back = None
        while time.monotonic() < stop_at:
            view = {w["name"]: w for w in requests.get(store.url + "/models", timeout=10).json()["workers"]}
            if view[victim_name]["health"]["up"] and back is None:
                back = time.monotonic() - restarted
                back_at.append(time.monotonic())
                break
            time.sleep(0.1)
        for t in threads:
            t.join(180)
        time.sleep(0.5)
        listing = requests.get(store.url + "/models", timeout=10).json()
        agree = {}
        for w in listing["workers"]:
            truth = requests.get(by_name[w["name"]].url + "/models", timeout=10).json()
            loaded = sorted(m["name"] for m in truth["loaded"])
            agree[w["name"]] = (sorted(w["cached"]) == sorted(c["name"] for c in truth["cached"])
                                and sorted(m["name"] for m in w["loaded"]) == loaded)
    finally:
        store.stop()
        for w in workers:
            w.stop()
    # A stream the killed worker was sending ends early for the client, who sees a 200: the store logs it.
    store_log = store.log()
    broke = store_log.count("worker stream broke off")
    errors = Counter(line.rsplit("error=", 1)[1].split()[0] for line in store_log.splitlines()
                     if line.startswith("[") is False and "[/user_request]" in line and " error=" in line)
    total = sum(outcomes.values())
    log.info("soak: %d workers, %d models, %d clients, %ds: %d requests", args.workers, args.models, args.clients,
             args.seconds, total)
    for key, n in outcomes.most_common():
        log.info("  %-40s %6d", key, n)
    failed = total - outcomes["ok"]
    log.info("failed: %d, of them on the killed worker after the kill: %d (%s)", failed, sum(on_victim.values()),
             dict(on_victim))
    log.info("streams cut short by the kill (the store's log): %d; request lines with an error: %s", broke,
             dict(errors))
    log.info("the store used the restarted worker again %.2fs after it answered /health; requests served by "
             "each worker after that: %s", back if back is not None else float("nan"), dict(served_after))
    log.info("views agree at the end: %s", agree)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("overhead")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--requests", type=int, default=200)
    p = sub.add_parser("soak")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--models", type=int, default=5)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=int, default=60)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="workers-bench-") as tmp:
        (run_overhead if args.command == "overhead" else run_soak)(args, Path(tmp))


if __name__ == "__main__":
    main()
