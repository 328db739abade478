"""A gunicorn gthread worker that keeps slow clients from tying up request threads.

gunicorn's gthread worker hands a connection to a thread as soon as its first byte arrives,
and the thread then blocks reading the rest: 32 clients that send a header and stall hold 32
threads, and /health waits behind them. Here the worker's event loop reads each request
without blocking until it is complete (headers, and a body of up to PREBUFFER_BYTES) and only
then gives it to a thread, so a stalled sender costs a buffer, not a thread. A request that is
not complete REQUEST_TIMEOUT_S after it began is answered 408 and closed.

Threads then read and write with a socket timeout of REQUEST_TIMEOUT_S: a large body that
stops arriving ends in 408 (ClientTimeout), and a response nobody reads for that long ends in a
cut connection, which closes the response iterator and so releases its model. The send buffer
is capped so an unread stream fills it within a few hundred tokens rather than megabytes.

gunicorn's own parser errors are answered with the JSON error envelope instead of HTML.

On a graceful stop (SIGTERM) the app's `extensions["on_graceful_stop"]` callables run, so
endless responses (the store's /events) end at once instead of holding the stop for the whole
graceful timeout.
"""

from __future__ import annotations

import errno
import json
import logging
import selectors
import socket
import threading
import time
from functools import partial

from gunicorn import util
from gunicorn.http import errors as http_errors
from gunicorn.workers.gthread import ThreadWorker, TConn

from model_swap.errors import ClientTimeout

log = logging.getLogger(__name__)

PREBUFFER_BYTES = 1 << 20  # bodies up to this size arrive whole before a thread sees them
SEND_BUFFER_BYTES = 64 << 10  # per connection: bounds kernel memory held for a slow reader
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# gunicorn's parser errors -> (status, reason, code) of the JSON answer; the first match wins.
PARSER_ERRORS = (
    (http_errors.LimitRequestLine, 414, "URI Too Long", "uri_too_long"),
    (http_errors.LimitRequestHeaders, 431, "Request Header Fields Too Large", "headers_too_large"),
    (http_errors.InvalidRequestLine, 400, "Bad Request", "invalid_request_line"),
    (http_errors.InvalidRequestMethod, 400, "Bad Request", "invalid_request_line"),
    (http_errors.InvalidHTTPVersion, 400, "Bad Request", "invalid_http_version"),
    ((http_errors.InvalidHeader, http_errors.InvalidHeaderName, http_errors.ObsoleteFolding,
      http_errors.InvalidSchemeHeaders), 400, "Bad Request", "invalid_header"),
    ((http_errors.InvalidChunkSize, http_errors.ChunkMissingTerminator, http_errors.InvalidChunkExtension),
     400, "Bad Request", "invalid_chunked_body"),
    (http_errors.UnsupportedTransferCoding, 501, "Not Implemented", "unsupported_transfer_coding"),
    (http_errors.ExpectationFailed, 417, "Expectation Failed", "expectation_failed"),
    (http_errors.ParseException, 400, "Bad Request", "bad_request"),
)


def error_response(status: int, reason: str, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 answer with the JSON error envelope, closing the connection."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class GuardedSocket(socket.socket):
    """A client socket whose "blocking" mode has a timeout, and whose timeouts say who stalled."""

    idle_timeout_s: float = 30.0

    @classmethod
    def adopt(cls, sock: socket.socket, idle_timeout_s: float) -> "GuardedSocket":
        guarded = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        guarded.idle_timeout_s = idle_timeout_s
        return guarded

    def setblocking(self, flag: bool) -> None:
        # gunicorn sets its sockets blocking before a thread reads or writes: bound every wait.
        self.settimeout(self.idle_timeout_s if flag else 0.0)

    def recv(self, *args):
        try:
            return super().recv(*args)
        except TimeoutError:
            raise ClientTimeout(f"the client sent nothing for {self.idle_timeout_s:g}s") from None

    def sendall(self, *args):
        try:
            return super().sendall(*args)
        except TimeoutError:
            log.warning("[serving] a client read nothing for %gs; cutting it off", self.idle_timeout_s)
            # gunicorn treats a broken pipe as the client going away: no traceback, the response closes.
            raise BrokenPipeError(errno.EPIPE, "the client stopped reading") from None


def _chunked_complete(body: bytes) -> bool:
    """Whether a chunked body holds its last chunk and trailers (or is malformed: let the parser say so)."""
    pos = 0
    while True:
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            return False
        try:
            size = int(body[pos:line_end].split(b";")[0].strip() or b"x", 16)
        except ValueError:
            return True
        if size == 0:
            rest = body[line_end + 2:]
            return rest.startswith(b"\r\n") or b"\r\n\r\n" in rest
        pos = line_end + 2 + size + 2
        if pos > len(body):
            return False


class _Arrival:
    """A request being read by the event loop: its bytes so far and its deadline."""

    def __init__(self, deadline: float):
        self.buf = bytearray()
        self.deadline = deadline
        self.continued = False


def _run_all(callbacks) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:  # one failing must not keep the others from running
            log.exception("graceful-stop callback %r failed", callback)


class GuardedThreadWorker(ThreadWorker):
    """ThreadWorker whose event loop reads each request whole before a thread takes it."""

    request_timeout_s: float = 30.0  # set by model_swap.serving.serve

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._arriving: dict[TConn, _Arrival] = {}

    def handle_exit(self, sig, frame):
        """A graceful stop: stop accepting, as gunicorn does, and tell the app (on a thread: this is a
        signal handler, which must not wait for the app's locks)."""
        super().handle_exit(sig, frame)
        callbacks = list(getattr(self.wsgi, "extensions", {}).get("on_graceful_stop", ()))
        if callbacks:
            threading.Thread(target=_run_all, args=(callbacks,), name="graceful-stop", daemon=True).start()

    def accept(self, listener):
        if self.cfg.is_ssl:  # TLS handshakes happen in threads; this worker does not read them ahead
            return super().accept(listener)
        try:
            client, addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        conn = TConn(self.cfg, GuardedSocket.adopt(client, self.request_timeout_s), addr, listener.getsockname())
        self._await_request(conn)

    def on_client_socket_readable(self, conn, client):
        """A kept-alive connection has a new request coming: read it in the event loop too."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._await_request(conn)

    def _await_request(self, conn: TConn) -> None:
        conn.sock.setblocking(False)
        self._arriving[conn] = _Arrival(time.monotonic() + self.request_timeout_s)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_arrival, conn))

    def _on_arrival(self, conn: TConn, _sock) -> None:
        arrival = self._arriving[conn]
        closed = False
        try:
            while len(arrival.buf) <= PREBUFFER_BYTES:
                data = conn.sock.recv(256 << 10)
                if not data:
                    closed = True
                    break
                arrival.buf += data
        except BlockingIOError:
            pass
        except OSError:
            self._drop(conn)
            return
        if closed and not arrival.buf:
            self._drop(conn)
        elif closed or self._complete(conn, arrival):
            # A half-closed client still gets its answer: the parser sees the end of its data.
            self.poller.unregister(conn.sock)
            del self._arriving[conn]
            conn.arrived = bytes(arrival.buf)
            self.enqueue_req(conn)

    def _complete(self, conn: TConn, arrival: _Arrival) -> bool:
        """Whether the request is all here (or too big to wait for, or malformed: the parser answers)."""
        buf = arrival.buf
        if len(buf) > PREBUFFER_BYTES:
            return True
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            return False
        lines = bytes(buf[:head_end]).decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                return True
            headers[name.strip().lower()] = value.strip()
        body = bytes(buf[head_end + 4:])
        if headers.get("expect", "").lower() == "100-continue" and not arrival.continued:
            # Answer the client's wait here and take the header out, so no thread does it again.
            arrival.continued = True
            kept = [line for line in lines if not line.lower().startswith("expect:")]
            arrival.buf = bytearray("\r\n".join(kept).encode("latin-1") + b"\r\n\r\n" + body)
            try:
                conn.sock.send(_CONTINUE)
            except OSError:
                return True
        if "transfer-encoding" in headers:
            return "chunked" not in headers["transfer-encoding"].lower() or _chunked_complete(body)
        if "content-length" in headers:
            try:
                declared = int(headers["content-length"])
            except ValueError:
                return True
            # A body too big to hold here goes to a thread once its headers are in, so the
            # handler can refuse it (no room on disk, a bad name) before any of it is sent;
            # that thread's reads are bounded by REQUEST_TIMEOUT_S like every other.
            return declared > PREBUFFER_BYTES or len(body) >= declared
        return True

    def handle(self, conn):
        arrived = getattr(conn, "arrived", None)
        if arrived is not None:
            conn.arrived = None
            conn.data_ready = True
            conn.init()
            conn.parser.unreader.unread(arrived)
        return super().handle(conn)

    def murder_pending(self):
        """Also close requests that did not arrive in time, and, once stopping, connections that sent nothing."""
        super().murder_pending()
        now = time.monotonic()
        for conn, arrival in list(self._arriving.items()):
            # A stopping worker still answers a request that is on its way (with Connection: close).
            if arrival.deadline <= now or (not self.alive and not arrival.buf):
                if arrival.buf:
                    log.warning("[serving] a request from %s did not arrive within %gs; answering 408",
                                conn.client[0] if conn.client else "?", self.request_timeout_s)
                    self._send_quietly(conn, error_response(
                        408, "Request Timeout", "request_timeout",
                        f"the request did not arrive within {self.request_timeout_s:g}s"))
                self._drop(conn)

    def _drop(self, conn: TConn) -> None:
        self._arriving.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        self.nr_conns -= 1
        conn.close()

    @staticmethod
    def _send_quietly(conn: TConn, data: bytes) -> None:
        try:
            conn.sock.send(data)
        except OSError:
            pass

    def handle_error(self, req, client, addr, exc):
        """Answer gunicorn's parser errors with the JSON envelope (anything else: gunicorn's own 500)."""
        for kinds, status, reason, code in PARSER_ERRORS:
            if isinstance(exc, kinds):
                break
        else:
            return super().handle_error(req, client, addr, exc)
        self.log.warning("Invalid request from ip=%s: %s", (addr or ("?",))[0], exc)
        try:
            util.write_nonblock(client, error_response(status, reason, code, str(exc) or reason))
        except Exception:
            self.log.debug("Failed to send error message.")
