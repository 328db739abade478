"""Cache policies over the worker's disk: a pure decision over names and sizes, no I/O.

Built on cachetools: lru is an LRUCache, ttl and lru-ttl are TTLCaches (which already
evict least-recently-used first when full), no-evict is a Cache whose popitem refuses.
Expired entries leave the live set at once but stay listed (their files are still on the
worker) until the next admission reports them as evicted.
Not thread-safe: the owner holds a lock around every call.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from typing import Callable

import cachetools


class CacheFull(Exception):
    """The policy refuses to admit a model (no-evict and full)."""


class TooLargeForCache(Exception):
    """The model alone exceeds the cache's byte bound."""


class _NoEvictCache(cachetools.Cache):
    """A cache that never chooses a victim."""

    def popitem(self):
        raise CacheFull("cache is full and the no-evict policy refuses new models")


class _SweepingTTLCache(cachetools.TTLCache):
    """A TTLCache that remembers every key it expires, including the sweeps cachetools
    runs on its own inside __setitem__ and friends, so none leaves a file behind unreported."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.swept: dict[str, int] = {}
        self.expiry: dict[str, float] = {}  # key -> when it expires on the timer's clock (for /api/ps)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.expiry[key] = self.timer() + self.ttl

    def expire(self, time=None):
        expired = super().expire(time)
        self.swept.update(expired)
        return expired


@dataclass(frozen=True)
class Admission:
    """The decision for one admission: what to evict first (in order)."""

    name: str
    evicted: tuple[str, ...]


class CachePolicy:
    """Which models live on the worker's disk; values are model sizes in bytes."""

    def __init__(self, name: str, cache: cachetools.Cache, max_count: float, max_bytes: int | None,
                 timer: Callable[[], float] = time.monotonic):
        self.name = name
        self._timer = timer
        self._cache = cache
        self._max_count = max_count
        self._max_bytes = max_bytes
        self._timed = isinstance(cache, _SweepingTTLCache)
        # Expired entries (name -> size) whose files are still on the worker: evicted at the
        # next admission. For ttl caches this is the dict the cache itself records its sweeps in.
        self._pending: dict[str, int] = cache.swept if self._timed else {}

    @property
    def timed(self) -> bool:
        """Whether entries expire with time (ttl, lru-ttl)."""
        return self._timed

    def _frozen_time(self):
        """Hold the ttl clock still for a compound step, so nothing expires half-way through it."""
        return self._cache.timer if self._timed else contextlib.nullcontext()

    def __contains__(self, name: str) -> bool:
        """Whether `name` is admitted and, for timed policies, not expired."""
        return name in self._cache

    def entries(self) -> list[str]:
        """Names whose files the worker holds: expired ones awaiting the sweep, then live ones, next victim first."""
        with self._frozen_time():
            live = list(self._cache.keys())
            return [k for k in self._pending if k not in live] + live

    def expires_at(self, name: str) -> float | None:
        """When `name`'s ttl runs out, on the policy's timer clock; None if it has no ttl or is not admitted."""
        if not self._timed or name not in self._cache:
            return None
        return self._cache.expiry.get(name)

    def total_bytes(self) -> int:
        return sum(self._cache.values())

    def touch(self, name: str) -> bool:
        """Mark `name` used now (recency and ttl restart); return whether it is admitted."""
        with self._frozen_time():
            size = self._cache.get(name)
            if size is None:
                return False
            # Re-setting moves the entry to most-recent and, for ttl, restarts its clock.
            self._cache[name] = size
            return True

    def use(self, name: str) -> bool:
        """Like touch, but an entry that expired while in use (its file still there) comes back to life."""
        with self._frozen_time():
            if self._timed:
                self._cache.expire()  # an entry that just expired moves to pending, where we find it
            if self.touch(name):
                return True
            size = self._pending.pop(name, None)
            if size is None:
                return False
            # No admission can run while a model is in use, so its old place is still free.
            self._cache[name] = size
            return True

    def admit(self, name: str, size: int) -> Admission:
        """Admit `name`, deciding victims; raises CacheFull or TooLargeForCache and then changes nothing."""
        if self._max_bytes is not None and size > self._max_bytes:
            raise TooLargeForCache(f"{name} ({size} bytes) exceeds MAX_CACHE_BYTES={self._max_bytes}")
        with self._frozen_time():
            if self.touch(name):
                return Admission(name, ())
            if self._timed:
                self._cache.expire()
            expired = tuple(self._pending)
            self._pending.clear()
            return Admission(name, expired + self._make_room_and_insert(name, size))

    def _make_room_and_insert(self, name: str, size: int) -> tuple[str, ...]:
        victims: list[tuple[str, int]] = []
        try:
            while self._cache and (len(self._cache) + 1 > self._max_count or self._over_bytes(size)):
                victims.append(self._cache.popitem())
        except CacheFull:
            for key, value in reversed(victims):  # unreachable for no-evict, kept for safety
                self._cache[key] = value
            raise
        self._cache[name] = size
        return tuple(key for key, _ in victims)

    def _over_bytes(self, size: int) -> bool:
        return self._max_bytes is not None and self.total_bytes() + size > self._max_bytes

    def discard(self, name: str) -> bool:
        """Forget `name` (its transfer failed, or it vanished from the worker)."""
        with self._frozen_time():
            was_pending = self._pending.pop(name, None) is not None
            return self._cache.pop(name, None) is not None or was_pending

    def clear(self) -> None:
        self._cache.clear()
        self._pending.clear()

    def expired(self) -> list[str]:
        """Entries that have expired but are still listed (their files await the sweep); timed policies only."""
        with self._frozen_time():
            if self._timed:
                self._cache.expire()
            return list(self._pending)

    def copy(self) -> "CachePolicy":
        """An independent copy on the same clock, to try a decision without changing this one."""
        return copy.deepcopy(self, {id(self._timer): self._timer})


def build_policy(policy: str, max_count: int, max_bytes: int | None = None, ttl_seconds: float | None = None,
                 timer: Callable[[], float] = time.monotonic) -> CachePolicy:
    """Make one of lru, no-evict, ttl, lru-ttl."""
    if policy == "lru":
        cache = cachetools.LRUCache(maxsize=math.inf)
        bound: float = max_count
    elif policy == "no-evict":
        cache = _NoEvictCache(maxsize=math.inf)
        bound = max_count
    elif policy == "ttl":
        cache = _SweepingTTLCache(maxsize=math.inf, ttl=ttl_seconds, timer=timer)
        bound = math.inf
    elif policy == "lru-ttl":
        cache = _SweepingTTLCache(maxsize=math.inf, ttl=ttl_seconds, timer=timer)
        bound = max_count
    else:
        raise ValueError(f"unknown cache policy {policy!r}")
    return CachePolicy(policy, cache, bound, max_bytes, timer)
