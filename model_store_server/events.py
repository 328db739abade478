"""What the store does, as events for GET /events (server-sent events) and the CLI.

Kinds: transfer_started, transfer_progress, transfer_done, load_started, loaded, unloaded,
evicted, rejected (and transfer_failed, load_failed), and with several workers worker_down and
worker_up (a probe read it again: what it kept and deleted). Each event is a flat JSON object with
"event", "ts" (Unix seconds), "worker" and "model". A slow subscriber loses events rather
than slowing the store: its queue is bounded and `dropped` counts what it missed.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from typing import Iterator

SUBSCRIBER_QUEUE = 1000
HEARTBEAT_S = 15.0
_CLOSED = {"event": "_closed"}  # what a subscriber finds in its queue once the bus is closed


class Subscription:
    """One listener's queue of events."""

    def __init__(self, bus: "EventBus"):
        self._bus = bus
        self.queue: queue.Queue[dict] = queue.Queue(SUBSCRIBER_QUEUE)
        self.dropped = 0

    def get(self, timeout: float) -> dict | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._bus.unsubscribe(self)


class EventBus:
    """Fans each published event out to every subscriber; publishing never blocks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[Subscription] = []
        self._closed = False

    def publish(self, kind: str, **fields) -> dict:
        event = {"event": kind, "ts": round(time.time(), 3), **fields}
        with self._lock:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            try:
                sub.queue.put_nowait(event)
            except queue.Full:
                sub.dropped += 1
        return event

    def subscribe(self) -> Subscription:
        sub = Subscription(self)
        with self._lock:
            if self._closed:
                sub.queue.put_nowait(_CLOSED)
            else:
                self._subscribers.append(sub)
        return sub

    def close(self) -> None:
        """The store is stopping: every subscription ends after the events already in its queue."""
        with self._lock:
            self._closed = True
            subscribers, self._subscribers = self._subscribers, []
        for sub in subscribers:
            while True:
                try:
                    sub.queue.put_nowait(_CLOSED)
                    break
                except queue.Full:  # a slow reader loses its oldest event rather than the end
                    try:
                        sub.queue.get_nowait()
                        sub.dropped += 1
                    except queue.Empty:
                        pass

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subscribers:
                self._subscribers.remove(sub)

    def subscribers(self) -> int:
        with self._lock:
            return len(self._subscribers)


def sse_frames(sub: Subscription, heartbeat_s: float = HEARTBEAT_S, worker: str | None = None) -> Iterator[str]:
    """`event: kind` / `data: {json}` frames (only `worker`'s, when given), and a comment now and then so
    proxies keep the line open."""
    try:
        yield ": model-swap events\n\n"
        while True:
            event = sub.get(heartbeat_s)
            if event is None:
                yield ": ping\n\n"
                continue
            if event is _CLOSED:
                yield ": the store is stopping\n\n"
                return
            if worker is not None and event.get("worker") != worker:
                continue
            yield f"event: {event['event']}\ndata: {json.dumps(event)}\n\n"
    finally:
        sub.close()


class Ticker:
    """Calls `fn` every `interval_s` on its own thread until stopped (progress reports)."""

    def __init__(self, interval_s: float, fn):
        self._stop = threading.Event()
        self._fn = fn
        self._interval_s = interval_s
        self._thread = threading.Thread(target=self._run, daemon=True, name="ticker")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._fn()

    def stop(self) -> None:
        self._stop.set()
