"""A streamed completion that the test reads only when it says so, to hold a model busy in the real tier.

The services free a model only after the last piece of its stream was written (the worker's
`_stream` and the store's `Forward.chunks` release in `finally`). A stream far longer than the socket
buffers between worker, store and reader stops there while the test does not read, so the model stays
busy exactly as long as the test says: no assumption about how fast tokens come. The worker must have
room for the tokens (start it with `--n-ctx 4096`). Measured here: with a 4 KiB receive buffer (as in
test_slow_clients.py, which never reads on), or 4000-8000 tokens at --n-ctx 8192, the rest took 6-80 s
once the test read on; 3000 tokens at 4096 with the default buffer take under 0.2 s."""

from __future__ import annotations

import json
import logging
import socket
import time

log = logging.getLogger(__name__)
HELD_TOKENS = 3000  # ~620 KB of SSE: six times what the buffers between worker, store and reader took in


class HeldStream:
    """POST /v1/completions with stream=true on a raw socket; read nothing until read_started/read_to_end."""

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

    def read_to_end(self) -> list[dict | str]:
        """Read the rest until the server closes; return the events' data (dicts, and "[DONE]")."""
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
