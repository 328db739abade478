"""Mixed load: many clients over more models than the cache holds, judged against LRU and Belady."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

from benchmarks.client import PROMPT, Completion, complete, percentile

WEIGHTS = (3, 2, 1)  # a hot, a warm and a cold model, as real traffic is rarely uniform


def lru_misses(order: list[str], capacity: int) -> int:
    """Transfers an LRU cache of `capacity` models needs for this order, starting empty."""
    cache: list[str] = []  # most recent last
    misses = 0
    for name in order:
        if name in cache:
            cache.remove(name)
        else:
            misses += 1
            if len(cache) == capacity:
                cache.pop(0)
        cache.append(name)
    return misses


def belady_misses(order: list[str], capacity: int) -> int:
    """The fewest transfers any cache of `capacity` models needs for this order (Belady's MIN)."""
    cache: set[str] = set()
    misses = 0
    for i, name in enumerate(order):
        if name in cache:
            continue
        misses += 1
        if len(cache) == capacity:
            def next_use(candidate: str) -> int:
                try:
                    return order.index(candidate, i + 1)
                except ValueError:
                    return len(order)

            cache.remove(max(cache, key=next_use))
        cache.add(name)
    return misses


def fewest_loads(order: list[str]) -> int:
    """Loads a worker that holds one model in memory needs for this order: one per change."""
    return sum(1 for i, name in enumerate(order) if i == 0 or order[i - 1] != name)


def run(url: str, model_ids: list[str], clients: int, seconds: float, max_tokens: int, capacity: int = 2,
        seed: int = 0, tick=lambda: None) -> dict:
    """`clients` threads, each asking in a loop for a model drawn by WEIGHTS, until `seconds` have passed."""
    deadline = time.perf_counter() + seconds
    records: list[tuple[str, Completion]] = []
    lock = threading.Lock()
    weights = WEIGHTS[:len(model_ids)]

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        n = 0
        while time.perf_counter() < deadline:
            model = rng.choices(model_ids, weights)[0]
            # A new connection per request: llama-server's router at times closes a reused
            # keep-alive connection without an answer, which would count a client artefact as an error.
            result = complete(url, model, max_tokens, f"[{index}.{n}] {PROMPT}")
            n += 1
            with lock:
                records.append((model, result))
            tick()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies = [r.total_s for _, r in records if r.ok]
    errors = Counter(r.error for _, r in records if not r.ok)
    result = {"clients": clients, "seconds": seconds, "wall_s": wall, "requests": len(records),
              "ok": len(latencies), "errors": dict(errors), "p50_s": percentile(latencies, 50),
              "p95_s": percentile(latencies, 95), "max_s": max(latencies, default=float("nan")),
              "weights": list(weights)}
    actions = [(r.action_at, model, r.cache_action) for model, r in records if r.cache_action]
    if actions:  # model-swap says what each request caused: compare with what the order needed
        served = [model for _, model, _ in sorted(actions, key=lambda a: a[0])]
        counts = Counter(action for _, _, action in actions)
        result.update(
            actions=dict(counts),
            told=len(actions),  # requests whose outcome was told (header or comment), to set against `ok`
            transfers=counts["load_from_store"],
            loads=counts["load_from_store"] + counts["load_from_local_store"],
            lru_transfers=lru_misses(served, capacity),
            belady_transfers=belady_misses(served, capacity),
            fewest_loads=fewest_loads(served),
        )
    return result
