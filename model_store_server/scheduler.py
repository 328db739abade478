"""Who may use the worker now: requests in arrival order, a swap only once the model drains.

States: idle; exclusive (one holder changes the worker: transfer, load, evict, reset);
shared(model, n) (n requests stream from the loaded model). The head of the queue
proceeds when the state is idle (it becomes exclusive) or shared on its own model (it
joins). Strict arrival order means a request for the loaded model that arrives behind
a waiting swap waits for it: no swap starves.
"""

from __future__ import annotations

import threading
from collections import deque


class Scheduler:
    """A fair exclusive/shared gate keyed by model name."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self._exclusive = False
        self._shared_model: str | None = None
        self._shared_count = 0
        self._share_closed = False  # set when the shared model turned out not to be loaded

    def acquire(self, model: str | None) -> bool:
        """Wait for this caller's turn; return True if it holds exclusive access, False if it joined."""
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            while True:
                if self._queue[0] is ticket:
                    if not self._exclusive and self._shared_count == 0:
                        self._exclusive = True
                        self._queue.popleft()
                        self._cond.notify_all()
                        return True
                    if (model is not None and not self._exclusive and self._shared_model == model
                            and not self._share_closed):
                        self._shared_count += 1
                        self._queue.popleft()
                        self._cond.notify_all()
                        return False
                self._cond.wait()

    def downgrade(self, model: str) -> None:
        """Turn exclusive access into a share of `model`, letting others for it join."""
        with self._cond:
            if not self._exclusive:
                raise RuntimeError("downgrade without exclusive access")
            self._exclusive = False
            self._shared_model, self._shared_count = model, 1
            self._share_closed = False
            self._cond.notify_all()

    def close_share(self) -> None:
        """Let no one else join the current share; the next request waits for it to drain."""
        with self._cond:
            if self._shared_count:
                self._share_closed = True

    def release_exclusive(self) -> None:
        with self._cond:
            self._exclusive = False
            self._cond.notify_all()

    def release_shared(self) -> None:
        with self._cond:
            self._shared_count -= 1
            if self._shared_count == 0:
                self._shared_model = None
                self._share_closed = False
            self._cond.notify_all()

    def snapshot(self) -> dict:
        """The gate's state, for /models and tests."""
        with self._cond:
            return {"exclusive": self._exclusive, "shared_model": self._shared_model,
                    "shared_count": self._shared_count, "waiting": len(self._queue)}
