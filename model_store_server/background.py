"""A background thread that sleeps until its next due time or until someone rings it."""

from __future__ import annotations

import threading


class BellThread:
    """One daemon thread running `_run`; `ring()` cuts its current wait short, `stop()` ends it."""

    def __init__(self, name: str):
        self._bell = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)

    def start(self) -> None:
        self._thread.start()

    def ring(self) -> None:
        """Something changed: look again now."""
        self._bell.set()

    def stop(self) -> None:
        self._stopped.set()
        self._bell.set()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def _sleep(self, seconds: float) -> None:
        """Wait `seconds` or until rung or stopped."""
        self._bell.wait(seconds)
        self._bell.clear()

    def _run(self) -> None:
        raise NotImplementedError
