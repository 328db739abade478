"""The store's tiers under load, against baselines measured in the same run.

    python benchmarks/tiers_bench.py mixed [--clients 32] [--seconds 60] [--max-loaded 1 2] [--models A,B,C]
    python benchmarks/tiers_bench.py alternate [--rounds 10] [--models A,B]
    python benchmarks/tiers_bench.py during-transfer [--big-mb 800] [--model A]

mixed            N clients, each asking for a random one of the models (--seed), for --seconds, once
                 per --max-loaded value (the worker's MAX_LOADED_MODELS; disk cache --max-cache-size):
                 requests, model changes per request (loads), transfers, p50/p95/max latency, the
                 longest wait for a turn (X-Queue-Ms) against --max-swap-wait-ms plus one generation,
                 errors, and whether the store's view equals the worker's at the end.
alternate        two models alternating, with memory for two and for one model, and the same model
                 repeated (no swap): median time to first byte of each, and their ratio.
during-transfer  time to first byte of a resident model while idle, and while a --big-mb model
                 (generated) is transferred and loaded: medians and their ratio.

Each run starts its own worker and store on free loopback ports, from --repo (default: this
checkout), so the same script measures another checkout (today's main, say) for a before/after.
A worker that holds one model at a time ignores MAX_LOADED_MODELS. Timings vary with the machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from model_swap.testing import free_port  # noqa: E402

log = logging.getLogger("tiers_bench")
REAL = ("SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf")


class Service:
    """`python -m module` from a checkout, on a free port, until stopped."""

    def __init__(self, repo: Path, module: str, args: list[str], log: Path, env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        python = repo / ".venv" / "bin" / "python"
        cmd = [str(python if python.exists() else sys.executable), "-m", module, *args, "--port", str(self.port)]
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=repo, env={**os.environ, **env, "PYTHONPATH": str(repo)},
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(self.url + "/health", timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{module} did not start; see {log}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@contextmanager
def stack(args, max_loaded: int, work: Path, cache_size: int, store_env: dict[str, str] | None = None):
    """A fresh worker (empty cache) and a store in front of it; settings by environment, which
    older checkouts ignore where they lack them."""
    tag = f"{max_loaded}-{time.monotonic_ns()}"
    worker = Service(args.repo, "inference_worker", ["--cache-dir", str(work / f"cache-{tag}")],
                     work / f"worker-{tag}.log", {"MAX_LOADED_MODELS": str(max_loaded)})
    try:
        store = Service(args.repo, "model_store_server",
                        ["--models-dir", str(args.models_dir), "--worker-url", worker.url, "--cache-policy", "lru",
                         "--max-cache-size", str(cache_size)],
                        work / f"store-{tag}.log", store_env or {})
        try:
            if max_loaded > 1 and "memory" not in requests.get(worker.url + "/models", timeout=10).json():
                log.info("  (this worker holds one model at a time: MAX_LOADED_MODELS=%d has no effect)", max_loaded)
            yield store, worker
        finally:
            store.stop()
    finally:
        worker.stop()


def ask(store_url: str, model: str, max_tokens: int) -> dict:
    """One streamed /user_request: status, action, times (s), queue wait (ms, if reported)."""
    started = time.perf_counter()
    try:
        r = requests.post(store_url + "/user_request", stream=True, timeout=600,
                          json={"prompt": "Name three colours.", "model": model, "max_tokens": max_tokens})
        first = None
        for chunk in r.iter_content(None):
            if first is None and chunk:
                first = time.perf_counter()
        total = time.perf_counter()
        code = None if r.status_code == 200 else r.json().get("error", {}).get("code")
    except (requests.RequestException, ValueError) as err:
        return {"status": 0, "code": type(err).__name__, "action": None, "ttfb": None, "total": None, "queue_ms": 0}
    return {"status": r.status_code, "code": code, "action": r.headers.get("X-Cache-Action"),
            "ttfb": (first or total) - started, "total": total - started,
            "queue_ms": float(r.headers.get("X-Queue-Ms") or 0)}


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))] if values else float("nan")


def views_agree(store_url: str, worker_url: str) -> bool:
    """The store's belief against the worker's own listing (disk and memory)."""
    mine = requests.get(store_url + "/models", timeout=10).json()
    truth = requests.get(worker_url + "/models", timeout=10).json()
    loaded = truth.get("loaded") or []
    loaded = [m["name"] if isinstance(m, dict) else m for m in (loaded if isinstance(loaded, list) else [loaded])]
    believed = mine["policy"].get("loaded")
    believed = believed if isinstance(believed, list) else [believed] if believed else []
    return (sorted(mine["policy"]["cached"]) == sorted(c["name"] for c in truth["cached"])
            and sorted(believed) == sorted(loaded))


def run_mixed(args, work: Path) -> None:
    models = args.models.split(",")
    log.info(f"mixed load: {args.clients} clients x {len(models)} models, {args.seconds}s, disk cache "
          f"{args.max_cache_size}, max_tokens {args.max_tokens}, MAX_SWAP_WAIT_MS {args.max_swap_wait_ms}")
    for max_loaded in args.max_loaded:
        with stack(args, max_loaded, work, args.max_cache_size,
                   {"MAX_SWAP_WAIT_MS": str(args.max_swap_wait_ms)}) as (store, worker):
            for model in models:  # warm: every model once, so llama.cpp's start-up is not measured
                ask(store.url, model, 1)
            results, lock = [], threading.Lock()
            stop = time.monotonic() + args.seconds

            def client(i: int) -> None:
                rng = random.Random(args.seed + i)
                while time.monotonic() < stop:
                    out = ask(store.url, rng.choice(models), args.max_tokens)
                    with lock:
                        results.append(out)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            ok = [r for r in results if r["status"] == 200]
            loads = sum(1 for r in ok if r["action"] in ("load_from_local_store", "load_from_store"))
            transfers = sum(1 for r in ok if r["action"] == "load_from_store")
            totals = [r["total"] for r in ok]
            hits = [r["total"] for r in ok if r["action"] == "already_loaded"]
            generation = pct(hits, 95)
            waits = [r["queue_ms"] / 1000 for r in ok]
            agree = views_agree(store.url, worker.url)
            log.info(f"  MAX_LOADED_MODELS={max_loaded}: requests {len(results)}, errors {len(results) - len(ok)} "
                  f"{sorted({r['code'] for r in results if r['status'] != 200}) or ''}, model changes {loads} "
                  f"({loads / max(1, len(ok)):.3f}/request), transfers {transfers}, latency p50 "
                  f"{pct(totals, 50):.3f}s p95 {pct(totals, 95):.3f}s max {max(totals, default=0):.3f}s; wait for a turn "
                  f"(X-Queue-Ms) p95 {pct(waits, 95):.3f}s max {max(waits, default=0):.3f}s, against the bound + "
                  f"a hit's p95 latency {args.max_swap_wait_ms / 1000 + generation:.3f}s; views agree: {agree}")


def median_ttfb(store_url: str, sequence: list[str], max_tokens: int) -> dict[str, float]:
    """Ask for each model in turn; the median time to first byte per model."""
    times: dict[str, list[float]] = {}
    for model in sequence:
        out = ask(store_url, model, max_tokens)
        if out["status"] != 200:
            raise SystemExit(f"{model}: HTTP {out['status']} {out['code']}")
        times.setdefault(model, []).append(out["ttfb"])
    return {m: statistics.median(t) for m, t in times.items()}


def run_alternate(args, work: Path) -> None:
    a, b = args.models.split(",")[:2]
    same = {}
    with stack(args, 1, work, 2) as (store, _):
        for model in (a, b):  # each model repeated: its own no-swap baseline
            ask(store.url, model, 1)
            same[model] = median_ttfb(store.url, [model] * args.rounds, args.max_tokens)[model]
    log.info(f"alternation {a} / {b}, {args.rounds} rounds, median time to first byte (no swap: "
             f"{same[a]:.3f}s / {same[b]:.3f}s)")
    for max_loaded in (1, 2):
        with stack(args, max_loaded, work, 2) as (store, _):
            ask(store.url, a, 1)
            ask(store.url, b, 1)
            got = median_ttfb(store.url, [a, b] * args.rounds, args.max_tokens)
        log.info(f"  MAX_LOADED_MODELS={max_loaded}: {a} {got[a]:.3f}s ({got[a] / same[a]:.1f}x no swap), "
                 f"{b} {got[b]:.3f}s ({got[b] / same[b]:.1f}x)")


def run_during_transfer(args, work: Path) -> None:
    model = args.models.split(",")[0]
    big = f"bench-big-{args.big_mb}mb.gguf"
    if not (args.models_dir / big).exists():
        subprocess.run([sys.executable, "-m", "inference_worker.testing.tiny_gguf", str(args.models_dir / big),
                        "--seed", "99", "--size-mb", str(args.big_mb)], check=True, cwd=REPO)
    with stack(args, 2, work, 3) as (store, _):
        ask(store.url, model, 1)
        idle = [ask(store.url, model, args.max_tokens)["ttfb"] for _ in range(args.rounds)]
        done = threading.Event()
        swap = {}

        def bring_big() -> None:
            swap.update(ask(store.url, big, 1))
            done.set()

        threading.Thread(target=bring_big).start()
        during = []
        while not done.is_set():
            during.append(ask(store.url, model, args.max_tokens)["ttfb"])
    p50_idle, p50_during = statistics.median(idle), statistics.median(during)
    log.info(f"{model} while {big} ({args.big_mb} MB) was transferred and loaded in {swap.get('total', 0):.2f}s "
          f"({swap.get('action')}): time to first byte p50 {p50_during:.3f}s max {max(during):.3f}s over {len(during)} "
          f"requests, idle p50 {p50_idle:.3f}s ({p50_during / p50_idle:.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["mixed", "alternate", "during-transfer"])
    p.add_argument("--repo", type=Path, default=REPO, help="the checkout whose services to run")
    p.add_argument("--models-dir", type=Path, default=REPO / "models")
    p.add_argument("--models", default=None, help="comma-separated file names in --models-dir")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--max-loaded", type=int, nargs="+", default=[1, 2])
    p.add_argument("--max-cache-size", type=int, default=2)
    p.add_argument("--max-swap-wait-ms", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--big-mb", type=int, default=800)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.repo = args.repo.resolve()
    args.models_dir = args.models_dir.resolve()
    if args.models is None:
        third = "tiny-smoke.gguf"
        if args.what == "mixed" and not (args.models_dir / third).exists():
            subprocess.run([sys.executable, "-m", "inference_worker.testing.tiny_gguf", str(args.models_dir / third),
                            "--seed", "20240605"], check=True, cwd=REPO)
        args.models = ",".join(REAL + ((third,) if args.what == "mixed" else ()))
    with tempfile.TemporaryDirectory(prefix="tiers-bench-") as work:
        {"mixed": run_mixed, "alternate": run_alternate, "during-transfer": run_during_transfer}[args.what](
            args, Path(work))


if __name__ == "__main__":
    main()
