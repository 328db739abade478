"""The verbs channel: clear errors without pyverbs or without a device, its logic over a fake of pyverbs,
and a transfer over a real device.

Which tests run depends on the machine: without pyverbs (the project's default install) the
"not installed" errors are checked for real; with pyverbs but no device (pip install
pyverbs==56.0rc1 on a kernel without RDMA) the "no device" errors are; with a device (for
instance Soft-RoCE: rdma link add rxe0 type rxe netdev eth0) a model crosses a real queue pair.
The worker's listener is tested in tests/inference_worker/test_rdma_listener.py, the store's
transport in tests/model_store_server/test_rdma_transport.py.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from model_store_server.rdma_transport import RdmaTransport
from model_swap.digest import sha256_file
from model_swap.errors import ApiError
from model_swap.rdma import testing_support
from model_swap.rdma.testing_support import (DEVICES, pyverbs_without_device, stored, with_device,
                                             without_pyverbs)
from model_swap.testing import REPO, free_port  # rdma_cm ports share the TCP/IP port numbers

model = testing_support.model  # the fixture


@without_pyverbs
def test_missing_pyverbs_is_rdma_unavailable_with_the_fix() -> None:
    from model_swap.rdma.verbs import load_pyverbs

    with pytest.raises(ApiError) as caught:
        load_pyverbs()
    assert (caught.value.status, caught.value.code) == (502, "rdma_unavailable")
    assert "pip install 'model-swap[rdma]'" in caught.value.message


@without_pyverbs
def test_verbs_entry_points_without_pyverbs_are_rdma_unavailable() -> None:
    from model_swap.rdma.protocol import ChannelSpec
    from model_swap.rdma.verbs import VerbsListener, connect

    for attempt in (lambda: connect("127.0.0.1", 8081, ChannelSpec.for_sender()),
                    lambda: VerbsListener("127.0.0.1", 8081, ChannelSpec.for_receiver())):
        with pytest.raises(ApiError) as caught:
            attempt()
        assert caught.value.code == "rdma_unavailable"


@pyverbs_without_device
def test_no_device_is_rdma_unavailable() -> None:
    from model_swap.rdma.verbs import rdma_devices

    with pytest.raises(ApiError) as caught:
        rdma_devices()
    assert caught.value.code == "rdma_unavailable"
    assert "no RDMA device" in caught.value.message


def _device_ipv4(device: str) -> str | None:
    """The IPv4 address of the network interface under an RDMA device (RoCE, iWARP), if any."""
    try:
        netdev = Path(f"/sys/class/infiniband/{device}/ports/1/gid_attrs/ndevs/0").read_text().strip()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", netdev.encode()[:15]))  # SIOCGIFADDR
    except OSError:
        return None
    return socket.inet_ntoa(packed[20:24])


@pytest.fixture
def rdma_listener(tmp_path: Path):
    """The worker's listener helper on a real device; yields (host, port, cache dir, its stdout)."""
    host = os.environ.get("MODEL_SWAP_RDMA_TEST_HOST") or _device_ipv4(DEVICES[0])
    if not host:
        pytest.skip(f"no IPv4 address found for {DEVICES[0]}; set MODEL_SWAP_RDMA_TEST_HOST")
    port, cache_dir = free_port(), tmp_path / "cache"
    cache_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "inference_worker.rdma_listener", "--cache-dir", str(cache_dir),
                             "--host", host, "--port", str(port), "--max-model-bytes", str(1 << 30),
                             "--reserve-disk-bytes", "0", "--parent-pid", str(os.getpid())],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(proc.stdout.readline())["event"] == "listening"
        yield host, port, cache_dir, proc.stdout
    finally:
        proc.terminate()
        proc.wait(10)


@with_device
def test_model_crosses_a_real_queue_pair(rdma_listener, model: Path) -> None:
    host, port, cache_dir, events = rdma_listener
    transport = RdmaTransport(host, port)
    try:
        sent = transport.send(stored(model))
    finally:
        transport.close()
    assert sent.transport == "rdma"
    event = json.loads(events.readline())
    assert event == {"event": "received", "name": "tiny.gguf", "size": model.stat().st_size,
                     "sha256": sha256_file(model)}
    assert (cache_dir / "tiny.gguf").read_bytes() == model.read_bytes()


@with_device
def test_digest_mismatch_over_a_real_queue_pair_leaves_nothing(rdma_listener, model: Path) -> None:
    host, port, cache_dir, events = rdma_listener
    transport = RdmaTransport(host, port)
    with pytest.raises(ApiError) as caught:
        transport.send(stored(model, sha256="0" * 64))
    transport.close()
    assert (caught.value.status, caught.value.code) == (502, "digest_mismatch")
    assert json.loads(events.readline())["event"] == "failed"
    assert list(cache_dir.iterdir()) == []


@with_device
def test_no_listener_is_rdma_connect_failed(model: Path) -> None:
    host = os.environ.get("MODEL_SWAP_RDMA_TEST_HOST") or _device_ipv4(DEVICES[0]) or "127.0.0.1"
    transport = RdmaTransport(host, free_port(), timeout_s=10)
    with pytest.raises(ApiError) as caught:
        transport.send(stored(model))
    transport.close()
    assert caught.value.code == "rdma_connect_failed"


# ---- verbs.py's own logic, over a fake of the pyverbs calls it makes ----------------------------------
# The fake follows the pyverbs 56.0 signatures verbs.py uses (CMID, CQ.poll, MR.buf, WC fields) and the
# RC rules as hardware keeps them: receives consumed in posting order, completions in order; a SEND
# nobody acknowledges fails once the retries run out (RETRY_EXC) and puts that end's QP in the error
# state, which flushes its posted receives; rdma_disconnect does that to its own end only. Nothing
# flushes the peer's receives: in the sync rdma_cm mode nobody reads its DISCONNECTED event. It checks
# our bookkeeping (buffers matched to completions, credits, close order, error codes), not pyverbs.

class FakeError(Exception):
    def __init__(self, message: str, error_code: int = 0):
        super().__init__(message)
        self.error_code = error_code


@dataclass
class FakeWC:
    status: int
    byte_len: int = 0
    vendor_err: int = 0


class FakeCQ:
    def __init__(self, context, cqe, cq_context=None, channel=None, comp_vector=0):
        self.entries: deque = deque()
        self.closed = False

    def poll(self, num_entries=1):
        taken = [self.entries.popleft() for _ in range(min(num_entries, len(self.entries)))]
        return len(taken), taken

    def close(self):
        self.closed = True


class FakeMR:
    def __init__(self, size: int):
        self.memory = ctypes.create_string_buffer(size)
        self.buf = ctypes.addressof(self.memory)


@dataclass
class FakeAddrInfo:
    src: str | None = None
    dst: str | None = None
    src_service: str | None = None
    dst_service: str | None = None
    port_space: int = 0
    flags: int = 0


FLUSH, RETRY_EXC, RNR_RETRY_EXC = 5, 12, 13


class FakeCMID:
    created: list = []
    listeners: dict = {}
    lock = threading.Lock()
    sends_before_cable_pull: int | None = None
    registration_error: int | None = None  # errno for reg_msgs to fail with
    post_recv_error: bool = False

    def __init__(self, creator=None):
        self.info, self.context, self.dev_name = creator, object(), "fake0"
        self.peer: FakeCMID | None = None
        self.posted: deque = deque()
        self.requests: queue.Queue = queue.Queue()
        self.settled = threading.Event()
        self.connected = self.closed = self.in_error = False
        FakeCMID.created.append(self)

    def listen(self, backlog=0):
        FakeCMID.listeners[(self.info.src, self.info.src_service)] = self

    def get_request(self):
        return self.requests.get(timeout=10)

    def create_qp(self, attr):
        self.send_cq, self.recv_cq = attr.scq, attr.rcq

    def reg_msgs(self, size):
        if FakeCMID.registration_error is not None:
            raise FakeError("Failed to register a MR", FakeCMID.registration_error)
        return FakeMR(size)

    def post_recv(self, mr):
        if FakeCMID.post_recv_error:
            raise FakeError("Failed to Post Receive", errno.EINVAL)
        if self.in_error:
            self.recv_cq.entries.append(FakeWC(FLUSH))
        else:
            self.posted.append(mr)

    def post_send(self, mr, flags, length):
        with FakeCMID.lock:
            if FakeCMID.sends_before_cable_pull is not None:
                FakeCMID.sends_before_cable_pull -= 1
                if FakeCMID.sends_before_cable_pull < 0 and self.peer is not None:
                    self.peer.peer = self.peer = None  # no flush anywhere: the ends just stop hearing each other
            if self.in_error:
                self.send_cq.entries.append(FakeWC(FLUSH))
            elif self.peer is None:  # nobody acknowledges
                self._fail(RETRY_EXC)
            elif not self.peer.posted:  # credits exist so this never happens; rnr_retry < 7 makes it fail
                self._fail(RNR_RETRY_EXC)
            else:
                target = self.peer.posted.popleft()
                ctypes.memmove(target.buf, mr.buf, length)
                self.peer.recv_cq.entries.append(FakeWC(0, length))
                self.send_cq.entries.append(FakeWC(0, length))

    def _fail(self, status: int) -> None:
        """A failed SEND: its error completion, then the QP in error flushes the receives posted on it."""
        self.send_cq.entries.append(FakeWC(status))
        self._to_error()

    def _to_error(self) -> None:
        self.in_error = True
        for _ in self.posted:
            self.recv_cq.entries.append(FakeWC(FLUSH))
        self.posted.clear()

    def connect(self, param):
        assert param["rnr_retry"] < 7, "rnr_retry=7 retries without end: a flow-control bug would hang"
        listener = FakeCMID.listeners.get((self.info.dst, self.info.dst_service))
        if listener is None:
            raise FakeError("Failed to Connect", errno.ECONNREFUSED)
        conn = FakeCMID()
        conn.peer, self.peer = self, conn
        listener.requests.put(conn)
        assert conn.settled.wait(10)
        if not conn.connected:  # the listener closed the request instead of accepting it: a reject
            self.peer = None
            raise FakeError("Failed to Connect", errno.ECONNREFUSED)
        self.connected = True

    def accept(self, param):
        self.connected = True
        self.settled.set()

    def disconnect(self):
        assert self.connected, "a sync disconnect of an id that never connected would wait forever"
        with FakeCMID.lock:
            self._to_error()  # this end's QP only; the peer hears of it from its next SEND, or not at all
            if self.peer is not None:
                self.peer.peer = self.peer = None

    def close(self):
        self.closed = True
        self.settled.set()


FAKE_PYVERBS = SimpleNamespace(
    ce=SimpleNamespace(RDMA_PS_TCP=262, RAI_PASSIVE=1),
    e=SimpleNamespace(IBV_QPT_RC=2, IBV_WC_SUCCESS=0, IBV_WC_WR_FLUSH_ERR=FLUSH, IBV_SEND_SIGNALED=2),
    CMID=FakeCMID, AddrInfo=FakeAddrInfo, ConnParam=lambda **kw: kw, CQ=FakeCQ, QPCap=lambda **kw: kw,
    QPInitAttr=lambda **kw: SimpleNamespace(**kw), get_device_list=lambda: [SimpleNamespace(name=b"fake0")],
    PyverbsError=FakeError)


@pytest.fixture
def fake_pyverbs(monkeypatch):
    from model_swap.rdma import verbs

    monkeypatch.setattr(verbs, "load_pyverbs", lambda: FAKE_PYVERBS)
    monkeypatch.setattr(FakeCMID, "created", [])
    monkeypatch.setattr(FakeCMID, "listeners", {})
    monkeypatch.setattr(FakeCMID, "sends_before_cable_pull", None)
    monkeypatch.setattr(FakeCMID, "registration_error", None)
    monkeypatch.setattr(FakeCMID, "post_recv_error", False)
    return verbs


def _fake_transfer(verbs, cache_dir: Path, model: Path, sha256: str | None = None, timeout_s: float = 5):
    """A listener thread and a sender here, over the fake; returns (sender error, receiver error, sender channel)."""
    from inference_worker.storage import ModelCache
    from model_swap.rdma.protocol import ChannelSpec, receive_file, send_file

    cache = ModelCache(cache_dir, 1 << 30, 0)
    listener = verbs.VerbsListener("10.0.0.2", 7471, ChannelSpec.for_receiver(4000, 4))
    errors: dict[str, ApiError] = {}

    def serve() -> None:
        channel = listener.accept()
        try:
            receive_file(channel, cache, timeout_s=timeout_s)
        except ApiError as err:
            errors["receiver"] = err
        finally:
            channel.close()

    thread = threading.Thread(target=serve)
    thread.start()
    channel = verbs.connect("10.0.0.2", 7471, ChannelSpec.for_sender(4000, 4))
    try:
        send_file(channel, model.name, model, model.stat().st_size, sha256 or sha256_file(model), timeout_s=timeout_s)
    except ApiError as err:
        errors["sender"] = err
    finally:
        channel.close()
    thread.join(10)
    assert not thread.is_alive(), "the receiver did not finish"
    return errors.get("sender"), errors.get("receiver"), channel


def test_verbs_channel_moves_a_model_over_fake_pyverbs(fake_pyverbs, model: Path, tmp_path: Path) -> None:
    sender_error, receiver_error, channel = _fake_transfer(fake_pyverbs, tmp_path / "cache", model)
    assert sender_error is None and receiver_error is None
    assert (tmp_path / "cache" / "tiny.gguf").read_bytes() == model.read_bytes()
    assert channel._cmid.closed and channel._sends.cq.closed and channel._recvs.cq.closed


def test_verbs_digest_mismatch_over_fake_pyverbs(fake_pyverbs, model: Path, tmp_path: Path) -> None:
    sender_error, receiver_error, _ = _fake_transfer(fake_pyverbs, tmp_path / "cache", model, sha256="0" * 64)
    assert sender_error.code == receiver_error.code == "digest_mismatch"
    assert list((tmp_path / "cache").iterdir()) == []


def test_verbs_cable_pull_over_fake_pyverbs(fake_pyverbs, model: Path, tmp_path: Path) -> None:
    # Nothing is flushed: whichever end SENDs next fails when its retries run out; an end waiting to
    # hear (the receiver for DATA, the sender for a credit) learns only from its own timeout.
    FakeCMID.sends_before_cable_pull = 30
    started = time.monotonic()
    sender_error, receiver_error, _ = _fake_transfer(fake_pyverbs, tmp_path / "cache", model, timeout_s=0.5)
    assert sender_error.code == receiver_error.code == "rdma_transfer_failed"
    assert time.monotonic() - started < 4
    assert list((tmp_path / "cache").iterdir()) == []


def test_verbs_receiver_outlasts_a_sender_that_vanished_by_its_idle_timeout(fake_pyverbs, tmp_path: Path,
                                                                             model: Path) -> None:
    from inference_worker.storage import ModelCache
    from model_swap.rdma.protocol import HEADER, MAGIC, VERSION, ChannelSpec, Kind, receive_file

    listener = fake_pyverbs.VerbsListener("10.0.0.2", 7471, ChannelSpec.for_receiver(4000, 4))
    errors: list[ApiError] = []

    def serve() -> None:
        channel = listener.accept()
        try:
            receive_file(channel, ModelCache(tmp_path / "cache", 1 << 30, 0), timeout_s=0.3)
        except ApiError as err:
            errors.append(err)
        finally:
            channel.close()

    thread = threading.Thread(target=serve)
    thread.start()
    sender = fake_pyverbs.connect("10.0.0.2", 7471, ChannelSpec.for_sender(4000, 4))
    body = json.dumps({"name": model.name, "size": model.stat().st_size, "sha256": sha256_file(model),
                       "control_depth": 8}).encode()
    buffer = sender.send_buffer(1)
    HEADER.pack_into(buffer.view, 0, MAGIC, VERSION, Kind.OPEN, 0, 0, len(body))
    buffer.view[HEADER.size:HEADER.size + len(body)] = body
    sender.send(buffer, HEADER.size + len(body))
    assert sender.recv(5) is not None  # READY: then the sender disconnects without a word
    sender.close()
    thread.join(5)
    assert errors and errors[0].code == "rdma_transfer_failed"
    assert "no message from the sender" in errors[0].message  # no flush told it: the idle timeout did
    assert list((tmp_path / "cache").iterdir()) == []


def test_verbs_connection_refused_over_fake_pyverbs(fake_pyverbs) -> None:
    from model_swap.rdma.protocol import ChannelSpec

    with pytest.raises(ApiError) as caught:
        fake_pyverbs.connect("10.0.0.9", 7471, ChannelSpec.for_sender())
    assert caught.value.code == "rdma_connect_failed"
    assert "refused" in caught.value.message


def test_default_buffers_fit_the_default_memlock_limit() -> None:
    from model_swap.rdma.protocol import ChannelSpec
    from model_swap.rdma.verbs import pinned_bytes

    eight_mib = 8 << 20  # RLIMIT_MEMLOCK on most Linux systems, for a process without CAP_IPC_LOCK
    for spec in (ChannelSpec.for_sender(), ChannelSpec.for_receiver()):
        assert pinned_bytes(spec, page=4096) <= 0.8 * eight_mib  # room left for the QP and CQs
        assert pinned_bytes(spec, page=65536) < eight_mib  # 64 KiB pages (some arm64 kernels)


def test_out_of_locked_memory_is_rdma_unavailable_with_the_fix(fake_pyverbs) -> None:
    from model_swap.rdma.protocol import ChannelSpec

    FakeCMID.registration_error = errno.ENOMEM
    with pytest.raises(ApiError) as caught:
        fake_pyverbs.connect("10.0.0.2", 7471, ChannelSpec.for_sender())
    assert caught.value.code == "rdma_unavailable"
    assert "RLIMIT_MEMLOCK" in caught.value.message and "LimitMEMLOCK" in caught.value.message
    [cmid] = FakeCMID.created
    assert cmid.closed and cmid.send_cq.closed and cmid.recv_cq.closed


def test_failed_setup_of_an_accepted_connection_closes_it_as_connect_failed(fake_pyverbs) -> None:
    from model_swap.rdma.protocol import ChannelSpec

    listener = fake_pyverbs.VerbsListener("10.0.0.2", 7471, ChannelSpec.for_receiver(4000, 4))
    request = FakeCMID()
    FakeCMID.listeners[("10.0.0.2", "7471")].requests.put(request)
    FakeCMID.post_recv_error = True  # repost() raises rdma_transfer_failed: not the code for a set-up
    with pytest.raises(ApiError) as caught:
        listener.accept()
    assert caught.value.code == "rdma_connect_failed"
    assert request.closed and request.send_cq.closed and request.recv_cq.closed


def test_unexpected_setup_error_is_an_api_error_and_closes_the_request(fake_pyverbs, monkeypatch) -> None:
    from model_swap.rdma.protocol import ChannelSpec

    listener = fake_pyverbs.VerbsListener("10.0.0.2", 7471, ChannelSpec.for_receiver(4000, 4))
    request = FakeCMID()
    FakeCMID.listeners[("10.0.0.2", "7471")].requests.put(request)
    monkeypatch.setattr(FakeCMID, "create_qp", lambda self, attr: 1 / 0)
    with pytest.raises(ApiError) as caught:
        listener.accept()
    assert caught.value.code == "rdma_connect_failed"
    assert request.closed
