"""The verbs channel: rdma_cm connection set-up and an RC queue pair, through pyverbs (imported lazily).

Each end registers its buffers with the CMID (rdma_reg_msgs) and moves messages with SEND/RECV
(rdma_post_send / rdma_post_recv). Completions are polled on CQs of our own, never waited for:
pyverbs 56 holds the GIL in every blocking call (get_request, connect, accept, disconnect,
get_send_comp/get_recv_comp), so the callers run this module in a helper process of their own
(inference_worker/rdma_listener.py, model_store_server/rdma_transport.py), never in a server thread.
rdma_post_* carry no work-request id, so buffers are matched to completions by order, which an RC
queue pair guarantees per queue.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import resource
import sys
import time
from collections import deque
from types import SimpleNamespace
from typing import TextIO

from model_swap.errors import ApiError
from model_swap.rdma import transfer_failed
from model_swap.rdma.protocol import ChannelSpec

log = logging.getLogger(__name__)

INSTALL_HINT = "install the rdma extra: pip install 'model-swap[rdma]'"
_BUSY_POLLS = 64  # empty polls before sleeping between polls
_POLL_SLEEP_S = 0.0002


def load_pyverbs() -> SimpleNamespace:
    """Import the pyverbs pieces this module uses, or raise 502 rdma_unavailable."""
    try:
        # Note: pyverbs.base calls logging.basicConfig at import; configure logging before this.
        import pyverbs.cm_enums as ce
        import pyverbs.enums as e
        from pyverbs.cmid import CMID, AddrInfo, ConnParam
        from pyverbs.cq import CQ
        from pyverbs.device import get_device_list
        from pyverbs.pyverbs_error import PyverbsError
        from pyverbs.qp import QPCap, QPInitAttr
    except ImportError as err:
        raise ApiError(502, "rdma_unavailable", f"pyverbs is not installed ({err}); {INSTALL_HINT}") from None
    return SimpleNamespace(ce=ce, e=e, CMID=CMID, AddrInfo=AddrInfo, ConnParam=ConnParam, CQ=CQ, QPCap=QPCap,
                           QPInitAttr=QPInitAttr, get_device_list=get_device_list, PyverbsError=PyverbsError)


def rdma_devices() -> list[str]:
    """Names of this machine's RDMA devices, or raise 502 rdma_unavailable."""
    pv = load_pyverbs()
    try:
        devices = pv.get_device_list()
    except pv.PyverbsError as err:
        raise ApiError(502, "rdma_unavailable", f"no RDMA device: listing verbs devices failed ({err}); "
                       "is the kernel's RDMA stack loaded (ib_core, rdma_ucm and a NIC driver or rdma_rxe)?") from None
    if not devices:
        raise ApiError(502, "rdma_unavailable", "no RDMA device: the verbs device list is empty")
    return [d.name.decode() if isinstance(d.name, bytes) else str(d.name) for d in devices]


def claim_stdout() -> TextIO:
    """In a helper process: keep stdout for messages to the parent; other output, Python's or C's, goes to stderr."""
    messages = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return messages


def _conn_param(pv: SimpleNamespace) -> object:
    # retry=7: the most transport retries. rnr_retry=6, not 7, which would retry without end: credits
    # keep every SEND within posted receives, so an RNR is a flow-control bug, to fail on, not to wait out.
    return pv.ConnParam(retry=7, rnr_retry=6)


def pinned_bytes(spec: ChannelSpec, page: int = mmap.PAGESIZE) -> int:
    """The memory registering spec's buffers locks: each is its own page-aligned, whole-page registration."""
    return page * (-(-spec.send_size // page) * spec.send_depth + -(-spec.recv_size // page) * spec.recv_depth)


def _setup_error(pv: SimpleNamespace, err: Exception, code: str, what: str, spec: ChannelSpec) -> ApiError:
    """The ApiError for a queue pair that could not be set up; ENOMEM is almost always RLIMIT_MEMLOCK."""
    if getattr(err, "error_code", None) == errno.ENOMEM:
        soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft / 2**20:g} MiB"
        return ApiError(502, "rdma_unavailable",
                        f"{what}: out of locked memory ({err}); the buffers pin {pinned_bytes(spec) / 2**20:.1f} MiB "
                        f"and RLIMIT_MEMLOCK is {limit}: raise it (ulimit -l; LimitMEMLOCK= in a systemd unit; "
                        "--ulimit memlock=-1 for a container)")
    if not isinstance(err, (ApiError, pv.PyverbsError)):
        log.error("[rdma] %s unexpectedly", what, exc_info=err)
    return ApiError(502, code, f"{what}: {err.message if isinstance(err, ApiError) else err}")


class Region:
    """One registered buffer and a writable view of its memory."""

    __slots__ = ("mr", "view", "length")

    def __init__(self, mr, size: int):
        self.mr = mr
        self.view = memoryview((ctypes.c_char * size).from_address(mr.buf)).cast("B")
        self.length = 0


class _CompletionQueue:
    """A CQ of our own, polled without blocking; a failed completion is raised after the good ones before it."""

    def __init__(self, pv: SimpleNamespace, context, depth: int):
        self.cq = pv.CQ(context, depth, None, None, 0)
        self._pv = pv
        self._failure: str | None = None

    def take(self, timeout_s: float) -> list:
        """Successful completions, oldest first, waiting up to timeout_s for the first."""
        deadline = time.monotonic() + timeout_s
        empty = 0
        while True:
            if self._failure is not None:
                raise transfer_failed(self._failure)
            try:
                _count, completions = self.cq.poll(16)
            except self._pv.PyverbsError as err:
                raise transfer_failed(f"polling the completion queue failed: {err}") from None
            good = []
            for wc in completions:
                if wc.status != self._pv.e.IBV_WC_SUCCESS:
                    # A message that arrived before the failure (RESULT, say) is still delivered first.
                    self._failure = ("connection broken off: work requests flushed"
                                     if wc.status == self._pv.e.IBV_WC_WR_FLUSH_ERR else
                                     f"work completion failed: status {wc.status}, vendor error {wc.vendor_err}")
                    break
                good.append(wc)
            if good:
                return good
            if self._failure is not None:
                raise transfer_failed(self._failure)
            if time.monotonic() >= deadline:
                return []
            empty += 1
            # sleep() gives up the GIL; spinning a little first keeps latency low mid-transfer.
            time.sleep(0 if empty < _BUSY_POLLS else _POLL_SLEEP_S)


class VerbsChannel:
    """An RC queue pair on a CMID, with its own send and receive CQs polled without blocking."""

    def __init__(self, pv: SimpleNamespace, cmid, spec: ChannelSpec):
        self.send_size = spec.send_size
        self.recv_size = spec.recv_size
        self.recv_depth = spec.recv_depth
        self._pv = pv
        self._cmid = cmid
        self.connected = False  # set by connect()/accept(); only a connected id may be disconnected
        self._closed = False
        self._sends = self._recvs = None
        self._free: deque[Region] = deque()
        self._in_flight: deque[Region] = deque()
        self._posted: deque[Region] = deque()
        self._arrived: deque[Region] = deque()
        try:
            self._sends = _CompletionQueue(pv, cmid.context, spec.send_depth)
            self._recvs = _CompletionQueue(pv, cmid.context, spec.recv_depth)
            cap = pv.QPCap(max_send_wr=spec.send_depth, max_recv_wr=spec.recv_depth, max_send_sge=1, max_recv_sge=1)
            cmid.create_qp(pv.QPInitAttr(qp_type=pv.e.IBV_QPT_RC, scq=self._sends.cq, rcq=self._recvs.cq, cap=cap,
                                         sq_sig_all=1))
            for _ in range(spec.send_depth):
                self._free.append(Region(cmid.reg_msgs(spec.send_size), spec.send_size))
            for _ in range(spec.recv_depth):  # posted before connecting, so the peer's first SEND fits
                self.repost(Region(cmid.reg_msgs(spec.recv_size), spec.recv_size))
        except BaseException:
            self.close()  # whatever was built: the CMID (its QP and MRs with it) and the CQs
            raise

    def _reap_sends(self, timeout_s: float) -> None:
        for _ in self._sends.take(timeout_s):
            self._free.append(self._in_flight.popleft())

    def send_buffer(self, timeout_s: float) -> Region:
        """A free send buffer, waiting for a send completion if all are in flight."""
        if self._in_flight:
            self._reap_sends(0)
        if not self._free:
            self._reap_sends(timeout_s)
        if not self._free:
            raise transfer_failed(f"no send completed within {timeout_s:.0f}s")
        return self._free.popleft()

    def send(self, buffer: Region, length: int) -> None:
        """Post a signalled SEND of buffer[:length]."""
        try:
            self._cmid.post_send(buffer.mr, self._pv.e.IBV_SEND_SIGNALED, length)
        except self._pv.PyverbsError as err:
            raise transfer_failed(f"posting a send failed: {err}") from None
        self._in_flight.append(buffer)

    def recv(self, timeout_s: float) -> Region | None:
        """The next received message, or None after timeout_s."""
        if not self._arrived:
            for wc in self._recvs.take(timeout_s):
                region = self._posted.popleft()
                region.length = wc.byte_len
                self._arrived.append(region)
        return self._arrived.popleft() if self._arrived else None

    def repost(self, buffer: Region) -> None:
        """Post a receive into buffer."""
        try:
            self._cmid.post_recv(buffer.mr)
        except self._pv.PyverbsError as err:
            raise transfer_failed(f"posting a receive failed: {err}") from None
        self._posted.append(buffer)

    def close(self) -> None:
        """Let the last sends complete (RESULT, END), disconnect, and free the verbs objects."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + 2.0
        try:
            while self._in_flight and time.monotonic() < deadline:
                self._reap_sends(0.1)
        except ApiError:
            pass
        for region in (*self._free, *self._in_flight, *self._posted, *self._arrived):
            try:  # the memory goes with its MR: nothing may read it afterwards
                region.view.release()
            except BufferError:
                pass
        # A sync rdma_disconnect waits for the DISCONNECTED event, which never comes for an id that
        # was refused or never connected. The QP goes with the CMID, before its CQs; it frees the MRs.
        steps = [self._cmid.disconnect] if self.connected else []
        steps += [self._cmid.close, *(q.cq.close for q in (self._sends, self._recvs) if q is not None)]
        for step in steps:
            try:
                step()
            except self._pv.PyverbsError as err:
                log.debug("[rdma] %s during close: %s", step.__name__, err)


def connect(host: str, port: int, spec: ChannelSpec) -> VerbsChannel:
    """Resolve host:port over rdma_cm, build the queue pair and connect; raise rdma_* ApiErrors."""
    pv = load_pyverbs()
    rdma_devices()
    where = f"{host}:{port}"
    try:
        cmid = pv.CMID(creator=pv.AddrInfo(dst=host, dst_service=str(port), port_space=pv.ce.RDMA_PS_TCP))
    except pv.PyverbsError as err:
        raise ApiError(502, "rdma_connect_failed", f"no RDMA route to {where}: {err}") from None
    try:
        channel = VerbsChannel(pv, cmid, spec)  # closes the CMID if it fails
    except Exception as err:
        raise _setup_error(pv, err, "rdma_unavailable", f"setting up a queue pair for {where} failed", spec) from None
    try:
        cmid.connect(_conn_param(pv))
    except Exception as err:
        channel.close()
        if getattr(err, "error_code", None) == errno.ECONNREFUSED:
            raise ApiError(502, "rdma_connect_failed", f"RDMA connection to {where} refused: is the worker's "
                           "RDMA listener running there (WORKER_RDMA_PORT)?") from None
        raise ApiError(502, "rdma_connect_failed", f"RDMA connection to {where} failed: {err}") from None
    channel.connected = True
    log.info("[rdma] connected to %s over %s", where, cmid.dev_name)
    return channel


class VerbsListener:
    """A listening rdma_cm id; accept() blocks, holding the GIL, until a sender connects."""

    def __init__(self, host: str, port: int, spec: ChannelSpec, backlog: int = 4):
        self._pv = pv = load_pyverbs()
        self._spec = spec
        self.devices = rdma_devices()
        try:
            info = pv.AddrInfo(src=host, src_service=str(port), port_space=pv.ce.RDMA_PS_TCP, flags=pv.ce.RAI_PASSIVE)
            self._cmid = pv.CMID(creator=info)
            self._cmid.listen(backlog)
        except pv.PyverbsError as err:
            raise ApiError(502, "rdma_unavailable",
                           f"cannot listen for RDMA connections on {host}:{port}: {err}") from None

    def accept(self) -> VerbsChannel:
        """Wait for a connection request, post receives, accept; raise rdma_connect_failed."""
        pv = self._pv
        try:
            conn = self._cmid.get_request()
        except pv.PyverbsError as err:
            raise ApiError(502, "rdma_connect_failed", f"connection request failed: {err}") from None
        try:
            channel = VerbsChannel(pv, conn, self._spec)  # closes the request's CMID if it fails
        except Exception as err:
            raise _setup_error(pv, err, "rdma_connect_failed", "setting up a queue pair for a connection failed",
                               self._spec) from None
        try:
            conn.accept(_conn_param(pv))
        except Exception as err:
            channel.close()
            raise ApiError(502, "rdma_connect_failed", f"accepting a connection failed: {err}") from None
        channel.connected = True
        return channel

    def close(self) -> None:
        """Stop listening."""
        try:
            self._cmid.close()
        except self._pv.PyverbsError as err:
            log.debug("[rdma] closing the listener: %s", err)
