"""What one worker has measured: its transfer rate, each model's load time and generation time.

Moving averages, so a slow first transfer (a cold page cache) does not stick; placement reads them.
"""

from __future__ import annotations

import threading

WEIGHT = 0.3  # of the newest measurement


def _blend(old: float | None, new: float) -> float:
    return new if old is None else old + WEIGHT * (new - old)


class WorkerMeasures:
    """Moving averages of what the executor saw on one worker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rate: float | None = None
        self._load_s: dict[str, float] = {}
        self._generation_s: dict[str, float] = {}

    def transferred(self, size: int, seconds: float) -> None:
        if seconds > 0 and size > 0:
            with self._lock:
                self._rate = _blend(self._rate, size / seconds)

    def loaded(self, name: str, seconds: float) -> None:
        with self._lock:
            self._load_s[name] = _blend(self._load_s.get(name), seconds)

    def generated(self, name: str, seconds: float) -> None:
        with self._lock:
            self._generation_s[name] = _blend(self._generation_s.get(name), seconds)

    def figures(self) -> tuple[float | None, dict[str, float], dict[str, float]]:
        """(bytes per second, load seconds per model, generation seconds per model)."""
        with self._lock:
            return self._rate, dict(self._load_s), dict(self._generation_s)
