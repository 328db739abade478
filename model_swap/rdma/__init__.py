"""RDMA transport pieces: the channel contract here, the protocol over it, and two channels.

- protocol.py: framing, credit flow control, the sender and the receiver; no verbs calls.
- inprocess.py: a loopback pair of channels joined by queues (not RDMA), for tests and docs.
- verbs.py: the real channel, an RC queue pair set up with rdma_cm through pyverbs (imported lazily).

Nothing the services import here imports pyverbs at import time; testing_support.py (tests
only) looks for devices when imported.
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol

from model_swap.errors import ApiError

class PeerError(ApiError):
    """An error the other end reported in a RESULT message."""


def transfer_failed(message: str) -> ApiError:
    """The error for a transfer that broke off or went wrong on the wire."""
    return ApiError(502, "rdma_transfer_failed", message)


class Buffer(Protocol):
    """A registered buffer: a writable view of its memory and the length of the message it holds."""

    view: memoryview
    length: int


class Channel(Protocol):
    """A reliable, ordered message connection whose receives must be posted before the peer sends."""

    send_size: int
    recv_size: int
    recv_depth: int

    def send_buffer(self, timeout_s: float) -> Buffer:
        """A free send buffer, waiting up to timeout_s for a send to complete; else rdma_transfer_failed."""

    def send(self, buffer: Buffer, length: int) -> None:
        """Post the first `length` bytes of `buffer` as one message."""

    def recv(self, timeout_s: float) -> Buffer | None:
        """The next received message, or None after timeout_s (0 polls once)."""

    def repost(self, buffer: Buffer) -> None:
        """Give a received buffer back to the receive queue."""

    def close(self) -> None:
        """Let pending sends finish, then disconnect."""


class ModelSink(Protocol):
    """Where the receiver lands a file: the worker's ModelCache."""

    def check_room(self, size: int | None) -> None: ...

    def receive(self, name: str, blocks: Iterable[bytes], size: int | None, sha256: str | None) -> Any: ...
