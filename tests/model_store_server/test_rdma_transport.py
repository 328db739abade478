"""The store's RDMA transport: clear errors without pyverbs or without a device, and its sender helper.

The transport sends through a helper process (python -m model_store_server.rdma_transport); without a
device the helper answers every job with an error and the transport relays it. A transfer over a real
device is tested in tests/model_swap/test_rdma_verbs.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from model_store_server.rdma_transport import RdmaTransport
from model_swap.digest import sha256_file
from model_swap.errors import ApiError
from model_swap.rdma import testing_support
from model_swap.rdma.testing_support import pyverbs_without_device, stored, without_device, without_pyverbs
from model_swap.testing import REPO, free_port

model = testing_support.model  # the fixture


@without_pyverbs
def test_store_transport_without_pyverbs_is_rdma_unavailable(model: Path) -> None:
    with pytest.raises(ApiError) as caught:
        RdmaTransport("127.0.0.1", free_port()).send(stored(model))
    assert (caught.value.status, caught.value.code) == (502, "rdma_unavailable")
    assert "pyverbs" in caught.value.message


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
