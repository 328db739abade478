"""Workload 8, parallel slots: model-swap's worker with N_PARALLEL 1, 4 and 8 (and 8 with flash
attention) against llama-server -np 8.

Each configuration runs on its own store and worker (all started here, so the repetitions can go
round them in turn), on the first model, with 1 and 8 concurrent streams of the plan's tokens:
the throughput workload's client and arithmetic, nothing else. Run alone with
`python -m benchmarks --systems model-swap --workloads slots`.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path


from benchmarks import workloads
from benchmarks.client import PROMPT, complete, median
from benchmarks.systems import LlamaServerRouter, ModelSwap, System, _worker_thread_flags
from model_swap.testing import ServiceProcess

SLOT_COUNTS = (1, 4, 8)
STREAMS = (1, 8)
BUSY_STREAMS = 7  # a joining request finds this many streams decoding
JOIN_PROMPT = "Hi"  # short: its TTFT is the wait for a step, not its prompt's evaluation
JOIN_AFTER_S = 0.3  # the busy streams have started generating by then


class ModelSwapSlots(ModelSwap):
    """model-swap as the suite runs it, with the worker's N_PARALLEL set."""

    def __init__(self, n_parallel: int, flash_attn: bool = False):
        super().__init__()
        self.n_parallel, self.flash_attn = n_parallel, flash_attn
        self.key = f"model-swap-np{n_parallel}{'-flash' if flash_attn else ''}"
        self.label = f"model-swap, N_PARALLEL={n_parallel}{', FLASH_ATTN=1' if flash_attn else ''}"

    def start(self, models: list[Path], workdir: Path, threads: int) -> None:
        env = {"N_THREADS": str(threads), "N_PARALLEL": str(self.n_parallel), "FLASH_ATTN": str(int(self.flash_attn))}
        self.worker = ServiceProcess("inference_worker", ["--cache-dir", str(workdir / "worker-cache"), "--log-level",
                                                          "WARNING", *_worker_thread_flags(threads)],
                                     workdir / "worker.log", env=env).start()
        self.store = ServiceProcess("model_store_server", [
            "--models-dir", str(models[0].parent), "--worker-url", self.worker.url, "--cache-policy", "lru",
            "--max-cache-size", str(self.max_cache_size), "--log-level", "WARNING"], workdir / "store.log").start()


def configurations() -> list[System]:
    # llama-server runs with flash attention (its default, auto): the last model-swap row does too.
    return [*(ModelSwapSlots(n) for n in SLOT_COUNTS), ModelSwapSlots(SLOT_COUNTS[-1], flash_attn=True),
            LlamaServerRouter(1)]


def steps(reps: int) -> int:
    """Progress-bar units."""
    return len(configurations()) * len(STREAMS) * reps


def measure(models: list[Path], workdir: Path, threads: int, tokens: int, reps: int, tick=lambda: None) -> dict:
    """tokens/s for 1 and 8 streams on every configuration; a configuration that cannot run says why.

    Every configuration is started first and the repetitions go round them in turn, so that load
    from other processes on a shared machine falls on all of them alike.
    """
    rows: list[dict] = []
    running: list[tuple[System, dict]] = []
    try:
        for system in configurations():
            row: dict = {"key": system.key, "label": system.label}
            rows.append(row)
            reason = system.unavailable()
            if reason:
                row["status"] = f"not run: {reason}"
                for _ in range(len(STREAMS) * reps):
                    tick()
                continue
            (workdir / f"slots-{system.key}").mkdir()
            try:
                system.start(models, workdir / f"slots-{system.key}", threads)
                running.append((system, row))
                row["status"] = "ok"
            except Exception as err:  # one configuration failing must not lose the others
                system.stop()
                row["status"] = f"failed: {type(err).__name__}: {err}"[:300]
        for _ in range(reps):
            for streams in STREAMS:
                for system, row in running:
                    if row["status"] != "ok":
                        continue
                    try:
                        run = workloads.throughput(system, system.model_id(models[0]), streams, tokens, 1, tick)
                    except Exception as err:
                        row["status"] = f"failed: {type(err).__name__}: {err}"[:300]
                        continue
                    kept = row.setdefault(f"streams_{streams}", {**run, "tokens_per_s": [], "tokens": []})
                    kept["tokens_per_s"] += run["tokens_per_s"]
                    kept["tokens"] += run["tokens"]
            for system, row in running:  # untimed by the bar: a few requests
                if row["status"] == "ok":
                    ttft = row.setdefault("ttft", {"idle_s": [], "joining_s": []})
                    idle, joining = _joining_ttft(system, system.model_id(models[0]), tokens)
                    ttft["idle_s"].append(idle)
                    ttft["joining_s"].append(joining)
    finally:
        for system, _ in running:
            system.stop()
    return {"model": models[0].name, "tokens_per_stream": tokens, "rows": rows}


def _joining_ttft(system: System, model: str, tokens: int) -> tuple[float, float]:
    """TTFT of a short request on the idle model, then joining BUSY_STREAMS streams of `tokens` tokens."""
    idle = complete(system.url, model, 4, JOIN_PROMPT)
    busy = [threading.Thread(target=complete, args=(system.url, model, tokens, f"({i}) {PROMPT}"))
            for i in range(BUSY_STREAMS)]
    for t in busy:
        t.start()
    time.sleep(JOIN_AFTER_S)
    joining = complete(system.url, model, 4, JOIN_PROMPT)
    for t in busy:
        t.join()
    nan = math.nan
    return (idle.ttft_s if idle.ok else nan), (joining.ttft_s if joining.ok else nan)


def _rate(row: dict, streams: int) -> float:
    run = row.get(f"streams_{streams}")
    return median(run["tokens_per_s"]) if run else math.nan


def _seconds(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f} s"


def section(result: dict | None) -> str:
    """bench.md's table: tok/s for 1 and 8 streams per configuration, against one stream and llama-server."""
    if not result:
        return "not run.\n"
    rows = result["rows"]
    server = next((r for r in rows if r["key"].startswith("llama-server")), {})
    server_8 = _rate(server, 8)

    def fmt(value: float, suffix: str = "") -> str:
        return "n/a" if math.isnan(value) else f"{value:.1f}{suffix}" if not suffix else f"{value:.2f}{suffix}"

    lines = [f"{result['model']}, {result['tokens_per_stream']} tokens per stream, median tok/s over the "
             f"repetitions. TTFT of a short prompt on the idle model, and joining {BUSY_STREAMS} streams "
             f"{JOIN_AFTER_S:g} s after they were sent (medians).\n",
             "| configuration | 1 stream | 8 streams | 8 ÷ 1 stream | 8 streams ÷ llama-server -np 8 | TTFT idle | "
             "TTFT joining | joining ÷ idle | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        one, eight = _rate(r, 1), _rate(r, 8)
        ttft = r.get("ttft") or {}
        idle, joining = (median([v for v in ttft.get(k, []) if not math.isnan(v)]) for k in ("idle_s", "joining_s"))
        lines.append(f"| {r['label']} | {fmt(one)} | {fmt(eight)} | {fmt(eight / one if one else math.nan, '×')} | "
                     f"{fmt(eight / server_8 if server_8 else math.nan, '×')} | {_seconds(idle)} | "
                     f"{_seconds(joining)} | {fmt(joining / idle if idle else math.nan, '×')} | {r['status']} |")
    return "\n".join(lines) + "\n"
