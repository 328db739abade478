"""The RDMA transfer protocol: framing, credit flow control, sender and receiver over a Channel.

Nothing here calls verbs. A Channel moves whole messages between registered buffers (verbs.py with
an RC queue pair, inprocess.py with queues), so the protocol is tested end to end without a device.

Every message is one SEND into one receive buffer the peer posted earlier, and starts with a
16-byte header: magic b"MSRD", version, kind, flags, seq, payload length (network byte order).

    sender                                   receiver (posts `depth` chunk buffers first)
    OPEN {name, size, sha256, token}   ->    (the sender's one initial credit)
                                       <-    READY {credits: depth, chunk}, or RESULT error
    DATA seq=0,1,... (one credit each) ->    written to the temp file, then the buffer is reposted
                                       <-    CREDIT seq=n (n buffers reposted)
    END {size, sha256 of what was sent} ->
                                       <-    RESULT {ok, size, sha256} or {ok: false, code, message}
    ABORT {message}                    ->    (instead of DATA or END: the sender gave up, and says why)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import struct
import time
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from model_swap.errors import ApiError
from model_swap.names import check_model_name
from model_swap.rdma import Buffer, Channel, ModelSink, PeerError, transfer_failed

log = logging.getLogger(__name__)

MAGIC = b"MSRD"
VERSION = 1
HEADER = struct.Struct("!4sBBHII")
CONTROL_SIZE = 4096
CONTROL_DEPTH = 8
DEFAULT_CHUNK = 1 << 20
# Six buffers of a chunk plus header (257 pages each) and the control buffers pin ~6.1 MiB per side,
# inside the 8 MiB RLIMIT_MEMLOCK most Linux systems give a non-root process; eight would not fit.
DEFAULT_DEPTH = 6
DEFAULT_TIMEOUT_S = 120.0  # the sender's wait for a credit or RESULT: the worker may be writing, fsyncing
# The receiver's wait for the sender's next message: the sender only reads its file, so a silence this
# long means it is gone (nothing reports a vanished peer on a queue pair in the sync rdma_cm mode).
DEFAULT_IDLE_TIMEOUT_S = 30.0
_SEQ_MASK = 0xFFFFFFFF
_HEX = frozenset("0123456789abcdef")


class Kind(IntEnum):
    """What a message is."""

    OPEN = 1
    READY = 2
    DATA = 3
    CREDIT = 4
    END = 5
    RESULT = 6
    ABORT = 7


@dataclass(frozen=True)
class ChannelSpec:
    """The registered buffers one end needs, per direction: how many and how large."""

    send_size: int
    send_depth: int
    recv_size: int
    recv_depth: int

    @classmethod
    def for_sender(cls, chunk: int = DEFAULT_CHUNK, depth: int = DEFAULT_DEPTH,
                   control_depth: int = CONTROL_DEPTH) -> "ChannelSpec":
        """Chunk-sized send buffers, small receive buffers for control messages."""
        return cls(HEADER.size + chunk, depth, CONTROL_SIZE, control_depth)

    @classmethod
    def for_receiver(cls, chunk: int = DEFAULT_CHUNK, depth: int = DEFAULT_DEPTH) -> "ChannelSpec":
        """Chunk-sized receive buffers (the credits), small send buffers for control messages."""
        return cls(CONTROL_SIZE, 4, HEADER.size + chunk, depth)


@dataclass(frozen=True)
class Message:
    """A parsed message; its payload is a view into the receive buffer until that is reposted."""

    kind: Kind
    seq: int
    payload: memoryview
    buffer: Buffer

    def body(self) -> dict:
        """The JSON object a control message carries."""
        try:
            value = json.loads(bytes(self.payload))
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise transfer_failed(f"malformed {self.kind.name} message")
        return value


def _whole(value: object, low: int) -> bool:
    """Whether a JSON value is an integer of at least low (booleans are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _frame(buffer: Buffer, kind: Kind, seq: int = 0, body: dict | None = None) -> int:
    """Write a header and optional JSON body into buffer; return the message length."""
    payload = json.dumps(body).encode() if body is not None else b""
    length = HEADER.size + len(payload)
    if length > len(buffer.view):
        raise transfer_failed(f"{kind.name} message of {length} bytes does not fit a {len(buffer.view)}-byte buffer")
    HEADER.pack_into(buffer.view, 0, MAGIC, VERSION, kind, 0, seq & _SEQ_MASK, len(payload))
    buffer.view[HEADER.size:length] = payload
    return length


def _post(channel: Channel, kind: Kind, timeout_s: float, seq: int = 0, body: dict | None = None) -> None:
    """Send one control message."""
    buffer = channel.send_buffer(timeout_s)
    channel.send(buffer, _frame(buffer, kind, seq, body))


def parse(buffer: Buffer) -> Message:
    """Check a received message's header and return it parsed."""
    if buffer.length < HEADER.size:
        raise transfer_failed(f"short message of {buffer.length} bytes")
    magic, version, kind, _flags, seq, length = HEADER.unpack_from(buffer.view, 0)
    if magic != MAGIC or version != VERSION:
        raise transfer_failed(f"not a model-swap RDMA message (magic {magic!r}, version {version})")
    if HEADER.size + length != buffer.length:
        raise transfer_failed(f"header says {length} payload bytes, message has {buffer.length - HEADER.size}")
    try:
        kind = Kind(kind)
    except ValueError:
        raise transfer_failed(f"unknown message kind {kind}") from None
    return Message(kind, seq, buffer.view[HEADER.size:buffer.length], buffer)


@dataclass(frozen=True)
class SendReport:
    """What a send did, for the log line and the tests."""

    size: int
    sha256: str
    chunk: int
    chunks: int
    credit_waits: int
    seconds: float
    receiver: dict


class _SenderState:
    """The sender's credits and what the receiver has said so far."""

    def __init__(self, channel: Channel, name: str, timeout_s: float):
        self.channel = channel
        self.name = name
        self.timeout_s = timeout_s
        self.credits = 1  # the receiver posts buffers before connecting: OPEN always fits
        self.credit_waits = 0
        self.ready: dict | None = None
        self.result: dict | None = None
        self.aborted = False

    def drain(self, timeout_s: float) -> bool:
        """Handle every control message that has arrived, waiting up to timeout_s for the first."""
        got = False
        while (buffer := self.channel.recv(0 if got else timeout_s)) is not None:
            got = True
            try:
                self._handle(parse(buffer))
            finally:
                self.channel.repost(buffer)
            if self.result is not None:  # the receiver is done and may already have disconnected
                break
        return got

    def _handle(self, message: Message) -> None:
        if message.kind is Kind.CREDIT and self.ready is not None:
            # More credits than READY granted would let a SEND meet an empty receive queue: fail
            # here, clearly, rather than in RNR retries on the wire.
            if self.credits + message.seq > self.ready["credits"]:
                raise transfer_failed(f"the receiver returned more credits than it granted "
                                      f"({self.credits} + {message.seq} > {self.ready['credits']})")
            self.credits += message.seq
        elif message.kind is Kind.READY and self.ready is None:
            ready = message.body()
            if not (_whole(ready.get("credits"), 1) and _whole(ready.get("chunk"), 1)):
                raise transfer_failed(f"malformed READY message: {ready}")
            self.ready = ready
            self.credits = ready["credits"]  # OPEN's buffer is reposted: all are free
        elif message.kind is Kind.RESULT:
            result = message.body()
            if not result.get("ok"):
                raise PeerError(502, str(result.get("code", "rdma_transfer_failed")),
                                f"worker refused {self.name} over RDMA: {result.get('message', '')}")
            self.result = result
        else:
            raise transfer_failed(f"unexpected {message.kind.name} message from the receiver")

    def wait_until(self, what: str, done: Callable[[], bool]) -> None:
        """Drain control messages until done() holds; time out with a clear message."""
        while not done():
            if not self.drain(self.timeout_s):
                raise transfer_failed(f"no {what} from the worker within {self.timeout_s:.0f}s")

    def take_credit(self) -> None:
        """Spend one credit, waiting for the receiver to return some when none is left."""
        self.drain(0)
        if self.credits == 0:
            self.credit_waits += 1
            self.wait_until("credit", lambda: self.credits > 0)
        self.credits -= 1

    def abort(self, message: str, buffer: Buffer | None = None) -> None:
        """Tell the receiver, once and best effort, why the transfer is off (`buffer`: its credit is spent).

        Without a free credit and send buffer the receiver learns of the end from its idle timeout.
        """
        if self.aborted or self.result is not None:
            return
        self.aborted = True
        try:
            if buffer is None:
                if self.credits < 1:
                    return
                buffer = self.channel.send_buffer(0)
                self.credits -= 1
            self.channel.send(buffer, _frame(buffer, Kind.ABORT, body={"message": message[:500]}))
        except ApiError as err:
            log.debug("[rdma] could not tell the receiver the transfer is off: %s", err.message)

    def peer_error(self) -> PeerError | None:
        """A RESULT error that already arrived: it says better than a broken channel what went wrong."""
        try:
            self.drain(0)
        except PeerError as err:
            return err
        except ApiError:
            return None
        return None


def _read_into(f: BinaryIO, view: memoryview) -> int:
    """Fill view from f; return the bytes read (fewer only at end of file)."""
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            break
        done += n
    return done


def _send_chunks(state: _SenderState, f: BinaryIO, path: Path, size: int, chunk: int) -> tuple[str, int]:
    """Send the file as DATA messages read straight into send buffers; return (sha256, chunks)."""
    channel, hasher, sent, seq = state.channel, hashlib.sha256(), 0, 0
    while sent < size:
        state.take_credit()
        buffer = channel.send_buffer(state.timeout_s)
        want = min(chunk, size - sent)
        body = buffer.view[HEADER.size:HEADER.size + want]
        try:
            got = _read_into(f, body)
            problem = None if got == want else f"{path} shrank to {sent + got} bytes while being sent"
        except OSError as err:
            problem = f"reading {path} failed: {err}"
        if problem:  # spend the credit we hold on telling the receiver why
            state.abort(problem, buffer)
            raise transfer_failed(problem)
        hasher.update(body)
        HEADER.pack_into(buffer.view, 0, MAGIC, VERSION, Kind.DATA, 0, seq & _SEQ_MASK, want)
        channel.send(buffer, HEADER.size + want)
        sent += want
        seq += 1
    return hasher.hexdigest(), seq


def send_file(channel: Channel, name: str, path: Path, size: int, sha256: str, *, token: str | None = None,
              timeout_s: float = DEFAULT_TIMEOUT_S) -> SendReport:
    """Send one model file over a connected channel; return when the worker has it verified on disk."""
    started = time.perf_counter()
    state = _SenderState(channel, name, timeout_s)
    try:
        f = open(path, "rb", buffering=0)  # unbuffered: readinto goes straight into the registered buffer
    except OSError as err:
        raise transfer_failed(f"cannot read {path}: {err}") from None
    try:
        state.take_credit()
        _post(channel, Kind.OPEN, timeout_s, body={"name": name, "size": size, "sha256": sha256, "token": token,
                                                   "control_depth": channel.recv_depth})
        state.wait_until("READY", lambda: state.ready is not None)
        chunk = min(state.ready["chunk"], channel.send_size - HEADER.size)
        digest, chunks = _send_chunks(state, f, Path(path), size, chunk)
        state.take_credit()
        _post(channel, Kind.END, timeout_s, body={"size": size, "sha256": digest})
        state.wait_until("RESULT", lambda: state.result is not None)
    except PeerError:
        raise
    except ApiError as err:
        failure = state.peer_error() or err
        if failure is err:  # the receiver does not know yet: spare it the wait for a sender gone quiet
            state.abort(err.message)
        raise failure from None
    except Exception as err:
        state.abort(f"the sender failed: {err.__class__.__name__}")
        raise
    finally:
        f.close()
    return SendReport(size, digest, chunk, chunks, state.credit_waits, time.perf_counter() - started, state.result)


def _expect(channel: Channel, timeout_s: float) -> Message:
    """The next message from the sender, or rdma_transfer_failed after timeout_s of silence."""
    buffer = channel.recv(timeout_s)
    if buffer is None:
        raise transfer_failed(f"no message from the sender for {timeout_s:g}s")
    return parse(buffer)


def _check_open(request: dict, token: str | None) -> tuple[str, int, str, int]:
    """Validate an OPEN request; return (name, size, sha256, control_depth)."""
    if token is not None and not hmac.compare_digest(str(request.get("token") or "").encode(), token.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong worker token in the RDMA OPEN message")
    name = check_model_name(request.get("name"))
    size, sha256, depth = request.get("size"), request.get("sha256"), request.get("control_depth")
    if not _whole(size, 0) or not _whole(depth, 2):
        raise ApiError(400, "invalid_request", "size must be an integer >= 0 and control_depth one >= 2")
    if not isinstance(sha256, str) or len(sha256) != 64 or not set(sha256.lower()) <= _HEX:
        raise ApiError(400, "invalid_request", "sha256 must be 64 hex digits")
    return name, size, sha256.lower(), depth


def _blocks(channel: Channel, size: int, sha256: str, batch: int, timeout_s: float) -> Iterator[bytes]:
    """Yield DATA payloads as bytes; repost each buffer at once, returning credits in batches."""
    received = seq = pending = 0
    while True:
        message = _expect(channel, timeout_s)
        if message.kind is Kind.DATA:
            if message.seq != seq & _SEQ_MASK:
                raise transfer_failed(f"chunk {message.seq} arrived where chunk {seq} was due")
            received += len(message.payload)
            if received > size:
                raise transfer_failed(f"sender sent more than the {size} bytes it announced")
            # A copy, because the cache may keep a block after asking for the next one (it writes
            # on another thread): a view of a reposted buffer would be overwritten under it.
            data = bytes(message.payload)
            channel.repost(message.buffer)
            seq += 1
            pending += 1
            if pending >= batch:
                _post(channel, Kind.CREDIT, timeout_s, seq=pending)
                pending = 0
            yield data
        elif message.kind is Kind.END:
            end = message.body()
            channel.repost(message.buffer)
            if end.get("size") != received:
                raise ApiError(400, "incomplete_body",
                               f"received {received} bytes, sender's END says {end.get('size')}")
            if end.get("sha256") != sha256:
                raise ApiError(422, "digest_mismatch",
                               f"the bytes sent hash to {end.get('sha256')}, not the announced {sha256}")
            return
        elif message.kind is Kind.ABORT:
            raise transfer_failed(f"sender aborted: {message.body().get('message', '')}")
        else:
            raise transfer_failed(f"unexpected {message.kind.name} message during the transfer")


def _report(channel: Channel, body: dict, timeout_s: float) -> None:
    """Tell the sender how it ended; a broken channel cannot be told, which its own error already says."""
    try:
        _post(channel, Kind.RESULT, timeout_s, body=body)
    except ApiError as err:
        log.debug("[rdma] could not report the result to the sender: %s", err.message)


def receive_file(channel: Channel, sink: ModelSink, *, token: str | None = None,
                 timeout_s: float = DEFAULT_IDLE_TIMEOUT_S) -> Any:
    """Serve one transfer on a connected channel: land the file through sink.receive and report back."""
    try:
        opened = _expect(channel, timeout_s)
        if opened.kind is not Kind.OPEN:
            raise transfer_failed(f"expected OPEN, got {opened.kind.name}")
        request = opened.body()
        channel.repost(opened.buffer)
        name, size, sha256, control_depth = _check_open(request, token)
        sink.check_room(size)  # refuse early, before any data moves
        # Keep one of the sender's control buffers free for RESULT; CREDIT messages share the rest.
        batch = -(-channel.recv_depth // (control_depth - 1))
        _post(channel, Kind.READY, timeout_s, body={"credits": channel.recv_depth,
                                                    "chunk": channel.recv_size - HEADER.size})
        receipt = sink.receive(name, _blocks(channel, size, sha256, batch, timeout_s), size, sha256)
    except ApiError as err:
        _report(channel, {"ok": False, "status": err.status, "code": err.code, "message": err.message}, timeout_s)
        raise
    except Exception:
        _report(channel, {"ok": False, "status": 500, "code": "worker_error",
                          "message": "unexpected error on the worker; see its log"}, timeout_s)
        raise
    _report(channel, {"ok": True, "size": receipt.size, "sha256": receipt.sha256}, timeout_s)
    return receipt
