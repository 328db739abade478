"""A streamed completion that the test reads only when it says so, to hold a model busy in the real tier.

The services free a model only after the last piece of its stream was written (the worker's
`_stream` and the store's `Forward.chunks` release in `finally`). A long SSE stream read through a
socket with a 4 KiB receive buffer fills every buffer on the way and stops there, so the model stays
busy exactly as long as the test does not read: no timing assumption about how fast tokens come.
The worker must have room for the tokens (start it with `--n-ctx 8192`)."""

from __future__ import annotations

import json
import logging
import socket
import time

log = logging.getLogger(__name__)
HELD_TOKENS = 8000  # ~1.5 MB of SSE: far beyond the socket buffers between worker, store and reader


class HeldStream:
    """POST /v1/completions with stream=true on a raw socket; read nothing until read_started/read_to_end."""

    def __init__(self, url: str, model: str, max_tokens: int = HELD_TOKENS):
        body = json.dumps({"model": model, "prompt": "count", "max_tokens": max_tokens, "temperature": 0,
                           "stream": True})
        host, port = url.removeprefix("http://").split(":")
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: it sets the window
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

    def read_to_end(self) -> list[dict | str]:
        """Read the rest until the server closes; return the events' data (dicts, and "[DONE]")."""
        # A 4 KiB window drains at a few KB per delayed ACK: open it, so the rest comes at loopback speed.
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        started = time.monotonic()
        while chunk := self._sock.recv(65536):
            self._received += chunk
        self._sock.close()
        log.info("held stream: read the rest in %.2fs", time.monotonic() - started)
        head, _, body = self._received.partition(b"\r\n\r\n")
        assert head.split(b" ", 2)[1] == b"200", head
        return [data if data == "[DONE]" else json.loads(data)
                for line in body.decode().splitlines() if line.startswith("data: ")
                for data in [line.removeprefix("data: ")]]

    def close(self) -> None:
        self._sock.close()
