"""GET /memory on a real worker, and the NVML reading through a fake pynvml (there is no GPU here)."""

from __future__ import annotations

import sys
import types

import pytest
import requests

from inference_worker.memory import gpu_memory_usage, host_available_bytes, process_rss_bytes

GIB = 1 << 30


def test_memory_report_has_real_numbers_and_no_invented_gpu(services, make_model, tmp_path):
    worker = services.worker(token="t0k")
    headers = {"Authorization": "Bearer t0k"}
    assert requests.get(worker.url + "/memory", timeout=10).status_code == 401  # not open like /health

    before = requests.get(worker.url + "/memory", headers=headers, timeout=10).json()
    assert before["rss_bytes"] > 10 * (1 << 20)  # a Python process with llama.cpp imported
    assert 0 < before["host_available_bytes"] and before["loaded"] == [] and before["used_bytes"] == 0
    assert before["gpu"] is None  # no NVML here: null, never a made-up figure

    model = make_model(tmp_path / "src", "a.gguf", seed=1, size_mb=8)
    r = requests.post(worker.url + "/load_model_from_store", data=model.read_bytes(),
                      headers={**headers, "X-Model-Name": "a.gguf"}, timeout=30)
    assert r.status_code == 200, r.text
    after = requests.get(worker.url + "/memory", headers=headers, timeout=10).json()
    assert after["loaded"] == ["a.gguf"] and after["used_bytes"] > 0
    assert after["rss_bytes"] > before["rss_bytes"]  # the 8 MB of weights are resident now


def test_host_available_and_rss_read_this_machine():
    meminfo = open("/proc/meminfo").read()
    assert host_available_bytes() is not None and "MemAvailable" in meminfo
    assert process_rss_bytes() > 0


class _FakeNvmlError(Exception):
    pass


def _fake_pynvml(devices: list[tuple[int, int, int]] | None, init_fails: bool = False) -> types.ModuleType:
    """A stand-in for nvidia-ml-py (no GPU here) with `devices` as (used, free, total)."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = _FakeNvmlError
    calls = []

    def init():
        if init_fails:
            raise _FakeNvmlError("NVML Shared Library Not Found")
        calls.append("init")

    nvml.nvmlInit = init
    nvml.nvmlShutdown = lambda: calls.append("shutdown")
    nvml.nvmlDeviceGetCount = lambda: len(devices or [])
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetMemoryInfo = lambda i: types.SimpleNamespace(used=devices[i][0], free=devices[i][1],
                                                                   total=devices[i][2])
    nvml.calls = calls
    return nvml


def test_gpu_usage_reads_every_device_through_nvml(monkeypatch):
    nvml = _fake_pynvml([(3 * GIB, 137 * GIB, 140 * GIB), (0, 80 * GIB, 80 * GIB)])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert gpu_memory_usage() == [
        {"index": 0, "used_bytes": 3 * GIB, "free_bytes": 137 * GIB, "total_bytes": 140 * GIB},
        {"index": 1, "used_bytes": 0, "free_bytes": 80 * GIB, "total_bytes": 80 * GIB},
    ]
    assert nvml.calls == ["init", "shutdown"]


@pytest.mark.parametrize("devices,init_fails", [(None, True), ([], False)])
def test_gpu_usage_is_none_without_a_device(monkeypatch, devices, init_fails):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(devices, init_fails))
    assert gpu_memory_usage() is None


def test_gpu_usage_is_none_without_nvidia_ml_py(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as if not installed
    assert gpu_memory_usage() is None
