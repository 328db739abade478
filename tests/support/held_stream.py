"""A streamed completion that the test does not read, to hold a model busy in the real tier.

The services free a model only after the last piece of its stream was written (the worker's
`_stream` and the store's `Forward.chunks` release in `finally`). A stream far longer than the socket
buffers between worker, store and reader stops there while the test does not read, so the model stays
busy exactly as long as the test says: no assumption about how fast tokens come. The worker must have
room for the tokens (start it with `--n-ctx 4096`). The test ends the hold by hanging up (close): the
store's next write fails at once. Reading on after a hold is not offered: it sometimes stalled for tens
of seconds in the sockets (measured here, cause not found)."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import requests

from tests.support.store_harness import wait_for

T = TypeVar("T")
HELD_TOKENS = 1500  # ~310 KB of SSE: three times what the buffers between worker, store and reader took in
# (fewer tokens, less generation: on a loaded 2-core machine a 3000-token hold slowed whole test runs)


class HeldStream:
    """POST /v1/completions with stream=true on a raw socket; read only its start (read_started)."""

    def __init__(self, url: str, model: str, max_tokens: int = HELD_TOKENS):
        body = json.dumps({"model": model, "prompt": "count", "max_tokens": max_tokens, "temperature": 0,
                           "stream": True})
        host, port = url.removeprefix("http://").split(":")
        self._sock = socket.socket()
        self._sock.settimeout(60)
        self._sock.connect((host, int(port)))
        # HTTP/1.0: the body is not chunked and ends when the server closes the connection.
        self._sock.sendall(f"POST /v1/completions HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        self._received = b""

    def read_started(self, timeout: float = 30) -> None:
        """Read until the first token's event has come (the generation holds its model), then stop reading."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self._received or b"data: {" not in self._received.partition(b"\r\n\r\n")[2]:
            assert time.monotonic() < deadline, "the held stream sent no token"
            chunk = self._sock.recv(4096)
            assert chunk, f"the server closed the held stream early: {self._received[:300]!r}"
            self._received += chunk

    def close(self) -> None:
        self._sock.close()


def answered_after_hold(url: str, model: str, call: Callable[[], T]) -> T:
    """Run `call` (a swap or switch that must unload `model`) while a stream of `model` is held, and
    return its answer. Before hanging up: the store must show `model`'s gate closed with its one use
    still running and the lane busy (the call waits for the drain), and the call must not have answered."""
    held = HeldStream(url, model)
    with ThreadPoolExecutor(1) as pool:
        try:
            held.read_started()
            answer = pool.submit(call)
            wait_for(lambda: (g := requests.get(url + "/models", timeout=10).json()["gates"])["closed"] == [model]
                     and g["uses"].get(model) == 1 and g["lane_busy"], timeout=30, every=0.01)
            assert not answer.done(), f"answered while {model}'s stream was still running"
        finally:
            held.close()  # the reader hangs up: the store's next write fails at once and the use ends
        return answer.result(timeout=60)
