"""A loopback pair of channels joined by in-process queues: not RDMA, a stand-in with its rules.

It keeps the rules of an RC queue pair that the protocol depends on, and fails loudly where a
verbs channel would fail: a SEND lands in the oldest receive buffer the peer has posted, in order;
a SEND when the peer has none posted fails (verbs: an RNR error), as does one longer than the
buffer (verbs: a local length error); a broken link lets messages already delivered be read, then
fails every recv, and loses every SEND without an error (verbs posts it, and fails it only once
its retries run out, seconds later: by then the end has read what was delivered). What it does
not model: memory registration, copies (this one copies each message), completion latency, and
the GIL-holding blocking calls of pyverbs.
"""

from __future__ import annotations

import queue
import threading
from collections import deque

from model_swap.rdma import transfer_failed
from model_swap.rdma.protocol import ChannelSpec

_BROKEN = object()


class Slot:
    """One buffer, standing in for a registered memory region."""

    __slots__ = ("view", "length")

    def __init__(self, size: int):
        self.view = memoryview(bytearray(size))
        self.length = 0


class _Link:
    """What the two ends share: one lock, whether the link is broken, and a fault to inject."""

    def __init__(self, break_after: int | None):
        self.lock = threading.Lock()
        self.broken = False
        self.messages = 0
        self.break_after = break_after


class InProcessChannel:
    """One end of a loopback pair; thread-safe, so each end can run on its own thread."""

    def __init__(self, spec: ChannelSpec, link: _Link):
        self.send_size = spec.send_size
        self.recv_size = spec.recv_size
        self.recv_depth = spec.recv_depth
        self.peer: InProcessChannel | None = None
        self.messages_sent = 0
        self.in_use = 0  # receive buffers holding a message, not yet reposted
        self.peak_in_use = 0
        self._link = link
        self._free = deque(Slot(spec.send_size) for _ in range(spec.send_depth))
        self._posted = deque(Slot(spec.recv_size) for _ in range(spec.recv_depth))
        self._arrived: queue.Queue = queue.Queue()

    @classmethod
    def pair(cls, a: ChannelSpec, b: ChannelSpec, *,
             break_after: int | None = None) -> tuple["InProcessChannel", "InProcessChannel"]:
        """Two connected ends; with break_after, the link breaks after that many messages in all."""
        link = _Link(break_after)
        first, second = cls(a, link), cls(b, link)
        first.peer, second.peer = second, first
        return first, second

    def send_buffer(self, timeout_s: float) -> Slot:
        """A free send buffer (sends complete at once here, so there always is one)."""
        if not self._free:
            raise transfer_failed("no free send buffer: more sends in flight than send buffers")
        return self._free.popleft()

    def send(self, buffer: Slot, length: int) -> None:
        """Copy buffer[:length] into the peer's oldest posted receive buffer."""
        peer = self.peer
        with self._link.lock:
            if self._link.broken:  # lost: recv is where this end learns the link is down
                self._free.append(buffer)
                return
            if not peer._posted:
                raise transfer_failed("receiver not ready: the peer has no receive buffer posted "
                                      "(a flow-control bug; verbs would fail with an RNR error)")
            slot = peer._posted.popleft()
            if length > len(slot.view):
                raise transfer_failed(f"message of {length} bytes exceeds the peer's {len(slot.view)}-byte buffer")
            slot.view[:length] = buffer.view[:length]
            slot.length = length
            peer.in_use += 1
            peer.peak_in_use = max(peer.peak_in_use, peer.in_use)
            peer._arrived.put(slot)
            self.messages_sent += 1
            self._link.messages += 1
            if self._link.break_after is not None and self._link.messages >= self._link.break_after:
                self._break()
        self._free.append(buffer)

    def recv(self, timeout_s: float) -> Slot | None:
        """The next delivered message, None after timeout_s; rdma_transfer_failed once the link is down."""
        try:
            item = self._arrived.get(timeout=timeout_s) if timeout_s > 0 else self._arrived.get_nowait()
        except queue.Empty:
            return None
        if item is _BROKEN:
            self._arrived.put(_BROKEN)  # every later call fails too, as on a QP in the error state
            raise transfer_failed("connection broken off by the peer")
        return item

    def repost(self, buffer: Slot) -> None:
        """Post a receive buffer again."""
        with self._link.lock:
            self._posted.append(buffer)
            self.in_use -= 1

    def close(self) -> None:
        """Disconnect: the peer reads what was delivered, then sees the connection end."""
        with self._link.lock:
            self._break()

    def _break(self) -> None:
        """Mark the link down and wake both ends (the caller holds the lock)."""
        if not self._link.broken:
            self._link.broken = True
            self._arrived.put(_BROKEN)
            self.peer._arrived.put(_BROKEN)
