"""The verbs channel: clear errors without pyverbs or without a device, and a transfer over a real device.

Which tests run depends on the machine: without pyverbs (the project's default install) the
"not installed" errors are checked for real; with pyverbs but no device (pip install
pyverbs==56.0rc1 on a kernel without RDMA) the "no device" errors are; with a device (for
instance Soft-RoCE: rdma link add rxe0 type rxe netdev eth0) a model crosses a real queue pair.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import importlib.util
import json
import logging
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from inference_worker import create_app
from inference_worker.config import WorkerConfig
from inference_worker.testing.tiny_gguf import write_tiny_gguf
from model_store_server.catalog import StoredModel
from model_store_server.rdma_transport import RdmaTransport
from model_swap.digest import sha256_file
from model_swap.errors import ApiError

REPO = Path(__file__).resolve().parents[2]
HAS_PYVERBS = importlib.util.find_spec("pyverbs") is not None


def _devices() -> list[str]:
    if not HAS_PYVERBS:
        return []
    from model_swap.rdma.verbs import rdma_devices

    try:
        return rdma_devices()
    except ApiError:
        return []


DEVICES = _devices()
without_pyverbs = pytest.mark.skipif(HAS_PYVERBS, reason="pyverbs is installed; this checks the error without it")
pyverbs_without_device = pytest.mark.skipif(not HAS_PYVERBS or bool(DEVICES),
                                            reason="needs pyverbs installed and no RDMA device")
without_device = pytest.mark.skipif(bool(DEVICES), reason="an RDMA device is present")
with_device = pytest.mark.skipif(not DEVICES, reason="needs pyverbs and an RDMA device: "
                                 + ("pyverbs is not installed" if not HAS_PYVERBS else "get_device_list() finds none"))


def free_port() -> int:
    """A TCP port nobody listens on right now (rdma_cm ports share the TCP/IP port numbers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stored(path: Path, sha256: str | None = None) -> StoredModel:
    return StoredModel(path.name, path, path.stat().st_size, sha256 or sha256_file(path))


@pytest.fixture
def model(tmp_path: Path) -> Path:
    (tmp_path / "store").mkdir()
    return write_tiny_gguf(tmp_path / "store" / "tiny.gguf", seed=11)


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


@without_pyverbs
def test_store_transport_without_pyverbs_is_rdma_unavailable(model: Path) -> None:
    with pytest.raises(ApiError) as caught:
        RdmaTransport("127.0.0.1", free_port()).send(stored(model))
    assert (caught.value.status, caught.value.code) == (502, "rdma_unavailable")
    assert "pyverbs" in caught.value.message


@without_device
def test_worker_with_rdma_port_and_no_device_warns_once_and_serves_http(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    config = WorkerConfig(cache_dir=tmp_path / "cache", rdma_port=free_port())
    app = create_app(config)
    listener = app.extensions["worker"]["rdma"]
    assert listener.enabled is False
    warnings = [r for r in caplog.records
                if r.name == "inference_worker.rdma_listener" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "rdma_unavailable" in warnings[0].getMessage() and "HTTP" in warnings[0].getMessage()
    assert app.test_client().get("/health").status_code == 200
    listener.stop()


@pyverbs_without_device
def test_no_device_is_rdma_unavailable() -> None:
    from model_swap.rdma.verbs import rdma_devices

    with pytest.raises(ApiError) as caught:
        rdma_devices()
    assert caught.value.code == "rdma_unavailable"
    assert "no RDMA device" in caught.value.message


@pyverbs_without_device
def test_store_transport_without_device_is_rdma_unavailable(model: Path) -> None:
    with pytest.raises(ApiError) as caught:
        RdmaTransport("127.0.0.1", free_port()).send(stored(model))
    assert (caught.value.status, caught.value.code) == (502, "rdma_unavailable")
    assert "no RDMA device" in caught.value.message


@without_device
def test_sender_helper_answers_every_job_line(model: Path) -> None:
    job = {"host": "127.0.0.1", "port": free_port(), "name": model.name, "path": str(model),
           "size": model.stat().st_size, "sha256": sha256_file(model), "timeout_s": 5}
    done = subprocess.run([sys.executable, "-m", "model_store_server.rdma_transport"], cwd=REPO, text=True,
                          input=json.dumps(job) + "\nnot json\n", capture_output=True, timeout=60)
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 0
    assert [(a["ok"], a["code"]) for a in answers] == [(False, "rdma_unavailable"), (False, "rdma_transfer_failed")]
    assert "bad job" in answers[1]["message"]


@without_device
def test_store_transport_relays_the_helpers_answer(model: Path, monkeypatch) -> None:
    # Past the in-process check, the real helper runs and answers; without a device it cannot connect.
    monkeypatch.setattr(RdmaTransport, "_check_available", staticmethod(lambda: None))
    transport = RdmaTransport("127.0.0.1", free_port())
    try:
        for _ in range(2):  # the second send reuses the helper
            with pytest.raises(ApiError) as caught:
                transport.send(stored(model))
            assert (caught.value.status, caught.value.code) == (502, "rdma_unavailable")
        helper = transport._helper
        assert helper is not None and helper.poll() is None
    finally:
        transport.close()
    assert helper.poll() is not None


@without_device
def test_store_transport_survives_a_dead_helper(model: Path, monkeypatch) -> None:
    monkeypatch.setattr(RdmaTransport, "_check_available", staticmethod(lambda: None))
    transport = RdmaTransport("127.0.0.1", free_port())
    transport._helper = subprocess.Popen([sys.executable, "-c", "pass"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
    transport._helper.wait()
    try:
        with pytest.raises(ApiError) as caught:
            transport.send(stored(model))  # the dead helper is replaced by a fresh one, which answers
        assert caught.value.code == "rdma_unavailable"
    finally:
        transport.close()


@pyverbs_without_device
def test_listener_helper_without_device_exits_unavailable(tmp_path: Path) -> None:
    from inference_worker.rdma_listener import EXIT_UNAVAILABLE

    done = subprocess.run([sys.executable, "-m", "inference_worker.rdma_listener", "--cache-dir", str(tmp_path),
                           "--host", "127.0.0.1", "--port", str(free_port()), "--max-model-bytes", "1000000",
                           "--reserve-disk-bytes", "0", "--parent-pid", str(os.getpid())],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_UNAVAILABLE
    assert "no RDMA device" in done.stderr


def test_listener_supervisor_counts_what_the_helper_reports(tmp_path: Path) -> None:
    from inference_worker.metrics import WorkerMetrics
    from inference_worker.rdma_listener import EXIT_UNAVAILABLE, RdmaListener
    from inference_worker.storage import ModelCache

    cache, metrics = ModelCache(tmp_path / "cache", 1 << 30, 0), WorkerMetrics()
    listener = RdmaListener(WorkerConfig(cache_dir=tmp_path / "cache", rdma_port=free_port()), cache, metrics)
    events = [{"event": "listening", "devices": ["x"]}, {"event": "received", "name": "a.gguf", "size": 5},
              {"event": "failed", "code": "digest_mismatch", "message": "m"}, {"no": "event"}]
    script = "; ".join(["import json, sys", *(f"print(json.dumps({e!r}))" for e in events),
                        "print('not json')", f"sys.exit({EXIT_UNAVAILABLE})"])
    listener._argv = [sys.executable, "-c", script]  # a stand-in helper: same pipe, same exit codes
    listener.start()
    listener._thread.join(10)
    assert not listener._thread.is_alive()  # "unavailable" is not restarted
    sample = metrics.registry.get_sample_value
    assert sample("worker_model_receives_total", {"result": "ok"}) == 1
    assert sample("worker_model_receives_total", {"result": "error"}) == 1
    assert sample("worker_model_bytes_received_total") == 5
    listener.stop()


def test_listener_supervisor_restarts_a_crashed_helper(tmp_path: Path) -> None:
    from inference_worker.metrics import WorkerMetrics
    from inference_worker.rdma_listener import EXIT_UNAVAILABLE, RdmaListener
    from inference_worker.storage import ModelCache

    runs = tmp_path / "runs"
    listener = RdmaListener(WorkerConfig(cache_dir=tmp_path / "cache", rdma_port=free_port()),
                            ModelCache(tmp_path / "cache", 1 << 30, 0), WorkerMetrics())
    script = (f"import sys, pathlib; p = pathlib.Path({str(runs)!r}); p.write_text(p.read_text() + 'x' "
              f"if p.exists() else 'x'); sys.exit(1 if len(p.read_text()) < 2 else {EXIT_UNAVAILABLE})")
    listener._argv = [sys.executable, "-c", script]
    listener.start()
    listener._thread.join(15)
    assert runs.read_text() == "xx"  # crashed once, restarted, then reported unavailable
    listener.stop()


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
# RC rules (receives consumed in posting order, completions in order, flushes after a disconnect). It
# checks our bookkeeping (buffers matched to completions, credits, close order, error codes), not pyverbs.

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


class FakeCMID:
    listeners: dict = {}
    lock = threading.Lock()
    sends_before_cable_pull: int | None = None

    def __init__(self, creator=None):
        self.info, self.context, self.dev_name = creator, object(), "fake0"
        self.peer: FakeCMID | None = None
        self.posted: deque = deque()
        self.requests: queue.Queue = queue.Queue()
        self.accepted = threading.Event()
        self.connected = self.closed = False

    def listen(self, backlog=0):
        FakeCMID.listeners[(self.info.src, self.info.src_service)] = self

    def get_request(self):
        return self.requests.get(timeout=10)

    def create_qp(self, attr):
        self.send_cq, self.recv_cq = attr.scq, attr.rcq

    def reg_msgs(self, size):
        return FakeMR(size)

    def post_recv(self, mr):
        self.posted.append(mr)

    def post_send(self, mr, flags, length):
        with FakeCMID.lock:
            if FakeCMID.sends_before_cable_pull is not None:
                FakeCMID.sends_before_cable_pull -= 1
                if FakeCMID.sends_before_cable_pull < 0:
                    self._drop()
            peer = self.peer
            if peer is None or peer.peer is None:
                self.send_cq.entries.append(FakeWC(FLUSH))
                return
            if not peer.posted:  # RNR: credits exist so this never happens
                self.send_cq.entries.append(FakeWC(13))
                return
            target = peer.posted.popleft()
            ctypes.memmove(target.buf, mr.buf, length)
            peer.recv_cq.entries.append(FakeWC(0, length))
            self.send_cq.entries.append(FakeWC(0, length))

    def connect(self, param):
        listener = FakeCMID.listeners.get((self.info.dst, self.info.dst_service))
        if listener is None:
            raise FakeError("Failed to Connect", errno.ECONNREFUSED)
        conn = FakeCMID()
        conn.peer, self.peer = self, conn
        listener.requests.put(conn)
        assert conn.accepted.wait(10)
        self.connected = True

    def accept(self, param):
        self.connected = True
        self.accepted.set()

    def _drop(self):
        for end in (self, self.peer):
            if end is not None and end.peer is not None:
                for _ in end.posted:
                    end.recv_cq.entries.append(FakeWC(FLUSH))
                end.posted.clear()
                end.peer = None

    def disconnect(self):
        assert self.connected, "a sync disconnect of an id that never connected would wait forever"
        with FakeCMID.lock:
            self._drop()

    def close(self):
        self.closed = True


FLUSH = 5
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
    monkeypatch.setattr(FakeCMID, "listeners", {})
    monkeypatch.setattr(FakeCMID, "sends_before_cable_pull", None)
    return verbs


def _fake_transfer(verbs, cache_dir: Path, model: Path, sha256: str | None = None):
    """A listener thread and a sender here, over the fake; returns (sender error, receiver error)."""
    from inference_worker.storage import ModelCache
    from model_swap.rdma.protocol import ChannelSpec, receive_file, send_file

    cache = ModelCache(cache_dir, 1 << 30, 0)
    listener = verbs.VerbsListener("10.0.0.2", 7471, ChannelSpec.for_receiver(4000, 4))
    errors: dict[str, ApiError] = {}

    def serve() -> None:
        channel = listener.accept()
        try:
            receive_file(channel, cache, timeout_s=5)
        except ApiError as err:
            errors["receiver"] = err
        finally:
            channel.close()

    thread = threading.Thread(target=serve)
    thread.start()
    channel = verbs.connect("10.0.0.2", 7471, ChannelSpec.for_sender(4000, 4))
    try:
        send_file(channel, model.name, model, model.stat().st_size, sha256 or sha256_file(model), timeout_s=5)
    except ApiError as err:
        errors["sender"] = err
    finally:
        channel.close()
    thread.join(10)
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
    FakeCMID.sends_before_cable_pull = 30
    sender_error, receiver_error, _ = _fake_transfer(fake_pyverbs, tmp_path / "cache", model)
    assert sender_error.code == receiver_error.code == "rdma_transfer_failed"
    assert list((tmp_path / "cache").iterdir()) == []


def test_verbs_connection_refused_over_fake_pyverbs(fake_pyverbs) -> None:
    from model_swap.rdma.protocol import ChannelSpec

    with pytest.raises(ApiError) as caught:
        fake_pyverbs.connect("10.0.0.9", 7471, ChannelSpec.for_sender())
    assert caught.value.code == "rdma_connect_failed"
    assert "refused" in caught.value.message
