"""A callback that runs at most once, from whichever thread gets there first."""

from __future__ import annotations

import threading
from typing import Callable


class Once:
    """Wraps `fn` so that calling it again, from any thread, does nothing."""

    def __init__(self, fn: Callable[[], None]):
        self._fn = fn
        self._done = False
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._fn()
