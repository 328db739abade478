"""Workloads 1-6, run the same way against every system (7, the transfer, is in transfer.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from benchmarks.client import PROMPT, Completion, complete
from benchmarks.systems import System

SWAP_TOKENS = 8  # enough to see the first token and a little of the stream
WARMUP_TIMEOUT_S = 600.0


class WorkloadError(RuntimeError):
    """A request that had to succeed for the measurement to mean anything did not."""


def _must(result: Completion, what: str) -> Completion:
    if not result.ok:
        raise WorkloadError(f"{what}: {result.error}")
    return result


def warm_swap(system: System, models: list[Path], reps: int, tick=lambda: None) -> dict:
    """Alternate two models that both are on the system's disk (or in its memory); TTFT per model file."""
    for path in models:  # untimed: puts both in the cache
        _must(complete(system.url, system.model_id(path), 1, timeout_s=WARMUP_TIMEOUT_S), f"warm-up of {path.name}")
    return _alternate(system, models, reps, tick, make_cold=False)


def cold_swap(system: System, models: list[Path], reps: int, tick=lambda: None) -> dict:
    """A model the system's cache does not hold: transfer, load, first token."""
    return _alternate(system, models, reps, tick, make_cold=True)


def _alternate(system: System, models: list[Path], reps: int, tick, make_cold: bool) -> dict:
    ttft: dict[str, list[float]] = {m.name: [] for m in models}
    actions: dict[str, list[str | None]] = {m.name: [] for m in models}
    for i in range(reps):
        for path in models:
            if make_cold:
                system.make_cold()
            result = _must(complete(system.url, system.model_id(path), SWAP_TOKENS, f"[{i}] {PROMPT}"),
                           f"swap to {path.name}")
            ttft[path.name].append(result.ttft_s)
            actions[path.name].append(result.cache_action)
            tick()
    return {"ttft_s": ttft, "actions": actions}


def no_swap(system: System, model: str, reps: int, tick=lambda: None) -> dict:
    """The loaded model: TTFT through the system's HTTP hops."""
    _must(complete(system.url, model, 1, timeout_s=WARMUP_TIMEOUT_S), f"warm-up of {model}")
    ttft = []
    for i in range(reps):
        ttft.append(_must(complete(system.url, model, SWAP_TOKENS, f"[{i}] {PROMPT}"), f"ask {model}").ttft_s)
        tick()
    return {"ttft_s": ttft}


def throughput(system: System, model: str, streams: int, tokens: int, reps: int, tick=lambda: None) -> dict:
    """`streams` concurrent requests of `tokens` tokens each; aggregate tokens per second."""
    _must(complete(system.url, model, 1, timeout_s=WARMUP_TIMEOUT_S), f"warm-up of {model}")
    rates, counts = [], []
    for rep in range(reps):
        results: list[Completion] = [None] * streams  # type: ignore[list-item]
        barrier = threading.Barrier(streams + 1)

        def one(i: int) -> None:
            barrier.wait()
            try:
                results[i] = complete(system.url, model, tokens, f"({rep}.{i}) {PROMPT}")
            except Exception as err:  # reported below as this stream's error
                results[i] = Completion(False, None, 0.0, 0, f"{type(err).__name__}: {err}")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
        for t in threads:
            t.start()
        barrier.wait()
        started = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        for r in results:
            _must(r, f"{streams} streams on {model}")
        total = sum(r.tokens for r in results)
        rates.append(total / wall)
        counts.append(total)
        tick()
    return {"streams": streams, "tokens_per_stream": tokens, "tokens_per_s": rates, "tokens": counts}


def memory(system: System, ids: list[str], swaps: int, tick=lambda: None) -> dict:
    """Resident memory with the first model loaded, then after `swaps` alternating swaps (ending on it)."""
    _must(complete(system.url, ids[0], 1, timeout_s=WARMUP_TIMEOUT_S), f"warm-up of {ids[0]}")
    before = system.rss_bytes()
    for i in range(swaps):
        model = ids[(i + 1) % 2] if i < swaps - 1 else ids[0]
        _must(complete(system.url, model, 1, f"[{i}] {PROMPT}"), f"swap to {model}")
        tick()
    time.sleep(0.5)  # freed memory reaches the process's counters a moment later
    return {"swaps": swaps, "before_bytes": before, "after_bytes": system.rss_bytes()}

