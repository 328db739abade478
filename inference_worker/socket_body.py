"""An upload's body taken straight off the connection: spliced into the file, hashed on the side.

The WSGI stream copies every byte several times (gunicorn's recv buffers, its read-ahead
BytesIO, the block handed to the app) before the cache writes it: at 250 MB that was most
of a push. Here the kernel moves the bytes from the socket into the file's page cache
(`splice` through a pipe, no copy into Python), and a second thread reads them back from the
page cache to hash them in place (a mapping, no copy), trailing the writer, so the hash costs
no time on the receive path. A third thread starts the disk write-back every 32 MiB
(fdatasync), and flushes the tail while the hasher finishes, so the fsync that makes the file
durable before it is published waits for neither all the bytes nor the hash.
Only gunicorn's plain sockets qualify; anything else (TLS, chunked bodies, another server,
Flask's test client) takes the ordinary stream.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any

PIPE_BYTES = 1 << 20  # one splice moves at most a pipe's capacity; 1 MiB keeps syscalls few
# (measured: 256-512 KiB cost 1.1-1.2x the receive time of 1 MiB, and 1.5-4 MiB 1.3-1.6x)


@dataclass
class RawBody:
    """A Content-Length body nobody has read yet, and the connection it is arriving on."""

    sock: socket.socket
    head: bytes  # body bytes the server had already read along with the headers
    length: int
    _wsgi_body: Any

    def consumed(self) -> None:
        """Tell the server the body was read to its end, so the connection can serve the next request."""
        self._wsgi_body.reader.length = 0

    def broken(self) -> None:
        """Tell the server where the next request starts is unknown: the connection must close."""
        self._wsgi_body.failed = True


def raw_body(environ: dict) -> RawBody | None:
    """The request's unread body on gunicorn's plain socket, or None when that is not what we have."""
    sock = environ.get("gunicorn.socket")
    body = environ.get("wsgi.input")
    reader = getattr(body, "reader", None)
    unreader = getattr(reader, "unreader", None)
    if (not hasattr(os, "splice") or not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket)
            or unreader is None
            or type(reader).__name__ != "LengthReader" or not hasattr(unreader, "take_buffered")
            or getattr(body, "buf", None) is None or body.buf.tell()):
        return None
    length = reader.length
    head = unreader.take_buffered()
    if len(head) > length:  # a pipelined next request: give its bytes back
        unreader.unread(head[length:])
        head = head[:length]
    return RawBody(sock, head, length, body)


class _Follower:
    """A thread that works through a file's bytes as another thread appends them."""

    step = 4 << 20  # smaller steps would cost more in wake-ups than they save

    def __init__(self, fd: int, name: str):
        self._fd = fd
        self._cond = threading.Condition()
        self._ready = 0
        self._taken = 0  # how far the thread has taken work: it sleeps until a step more has come
        self._done = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def advance(self, written: int) -> None:
        with self._cond:
            self._ready = written
            if written - self._taken >= self.step:  # a wake-up per step, not per splice (~750 KB)
                self._cond.notify()

    def _run(self) -> None:
        done_upto = 0
        try:
            while True:
                with self._cond:
                    while not self._done and self._ready - done_upto < self.step:
                        self._cond.wait()
                    ready, done = self._ready, self._done
                    self._taken = ready  # advance() wakes us again once a step more than this has come
                if ready > done_upto:
                    self._work(done_upto, ready, final=done)
                    done_upto = ready
                if done:
                    return
        except BaseException as err:  # handed to the receiving thread
            self._error = err

    def _work(self, start: int, end: int, final: bool) -> None:
        raise NotImplementedError

    def __enter__(self):
        self._thread.start()
        return self

    def finish(self) -> None:
        """No more bytes will come: work through the rest (without waiting for it)."""
        with self._cond:
            self._done = True
            self._cond.notify()

    def __exit__(self, *exc) -> None:
        self.finish()
        self._thread.join()

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


class _Hasher(_Follower):
    """sha256 of the bytes, read in place from the page cache through a mapping (no copy)."""

    def __init__(self, fd: int):
        super().__init__(fd, "cache-hasher")
        self._sha = hashlib.sha256()

    def _work(self, start: int, end: int, final: bool) -> None:
        # Mappings start on a granularity boundary; the bytes before `start` in the first one are skipped.
        base = start - start % mmap.ALLOCATIONGRANULARITY
        if os.fstat(self._fd).st_size < end:
            raise OSError(f"file ended before {end} bytes while hashing")
        with mmap.mmap(self._fd, end - base, prot=mmap.PROT_READ, offset=base) as mapped, \
                memoryview(mapped) as view:
            self._sha.update(view[start - base:])

    def hexdigest(self) -> str:
        self.raise_if_failed()
        return self._sha.hexdigest()


class _Flusher(_Follower):
    """Starts the disk write-back while bytes still arrive, so the final fsync has little left.

    The last flush, of the tail, runs while the hasher finishes its own tail: the two waits overlap.
    """

    step = 32 << 20  # each call also commits the journal: not too often

    def __init__(self, fd: int):
        super().__init__(fd, "cache-flusher")

    def _work(self, start: int, end: int, final: bool) -> None:
        os.fdatasync(self._fd)


def _wait_readable(sock: socket.socket) -> None:
    """Block until the socket has data, by the socket's own rules: its timeout, its exceptions."""
    sock.recv(1, socket.MSG_PEEK)


def splice_into(body: RawBody, fd: int) -> tuple[str, int]:
    """Move the body into the open file `fd`, hashing as it lands; return (sha256 hex, bytes).

    Never reads past the declared length; stops early when the client closes (the caller
    checks the size).
    """
    with _Hasher(fd) as hasher, _Flusher(fd) as flusher:
        view = memoryview(body.head)
        while view:
            view = view[os.write(fd, view):]
        written = len(body.head)
        hasher.advance(written)
        pipe_r, pipe_w = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                capacity = fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:  # above /proc/sys/fs/pipe-max-size for this user: keep the default
                capacity = fcntl.fcntl(pipe_w, fcntl.F_GETPIPE_SZ)
            sock_fd = body.sock.fileno()
            while written < body.length:
                try:
                    n = os.splice(sock_fd, pipe_w, min(capacity, body.length - written))
                except BlockingIOError:  # a socket with a timeout is non-blocking underneath
                    _wait_readable(body.sock)
                    continue
                if n == 0:
                    break  # the client closed early
                while n:
                    moved = os.splice(pipe_r, fd, n)
                    n -= moved
                    written += moved
                hasher.advance(written)
                flusher.advance(written)
        finally:
            os.close(pipe_r)
            os.close(pipe_w)
        hasher.finish()  # both tails at once: the last hash step and the last flush
        flusher.finish()
    flusher.raise_if_failed()
    return hasher.hexdigest(), written
