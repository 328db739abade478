"""Once: a release that many threads may call runs exactly once."""

from __future__ import annotations

import threading

from model_swap.once import Once


def test_runs_once_across_threads():
    calls = []
    once = Once(lambda: calls.append(1))
    threads = [threading.Thread(target=once) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    once()
    assert calls == [1]
