"""Memory arithmetic: the automatic budget (fake /proc and cgroup files, a fake GPU) and the KV cache
size from a GGUF header against what llama.cpp itself allocates."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

from inference_worker.memory import (AUTO_FRACTION, GPU_RESERVE_FRACTION, MIB, detect_budget, estimate_model_memory,
                                     kv_cache_bytes, process_rss_bytes)
from model_swap.gguf import read_header

GIB = 1 << 30
MODELS = Path(__file__).resolve().parents[2] / "models"
REAL_MODELS = ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"]


def _meminfo(tmp_path: Path, available_kib: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       99999999 kB\nMemFree:         1000 kB\nMemAvailable:   {available_kib} kB\n")
    return path


def _cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


def _no_gpu() -> bool:
    return False


@pytest.mark.parametrize("cgroup,expected_available,source", [
    ({}, 10 * GIB, "MemAvailable"),
    ({"memory.max": "max", "memory.current": "123"}, 10 * GIB, "MemAvailable"),
    ({"memory.max": str(4 * GIB), "memory.current": str(GIB)}, 3 * GIB, "cgroup"),
    ({"memory.max": str(64 * GIB), "memory.current": str(GIB)}, 10 * GIB, "MemAvailable"),
    ({"memory/memory.limit_in_bytes": str(2 * GIB), "memory/memory.usage_in_bytes": str(GIB)}, GIB, "cgroup"),
    ({"memory/memory.limit_in_bytes": str(9223372036854771712)}, 10 * GIB, "MemAvailable"),  # v1: no limit
])
def test_auto_budget_takes_the_lower_of_meminfo_and_cgroup(tmp_path, cgroup, expected_available, source):
    budget = detect_budget(_meminfo(tmp_path, 10 * GIB // 1024), _cgroup(tmp_path, cgroup), gpu_build=_no_gpu)
    assert budget.bytes == int(expected_available * AUTO_FRACTION)
    assert source in budget.source and str(expected_available) in budget.source


def test_auto_budget_on_this_machine_is_below_what_is_available():
    budget = detect_budget()
    available = int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
    assert 0 < budget.bytes <= available


def test_gpu_build_budgets_the_device_through_nvml(tmp_path):
    # A fake device: there is no GPU here. The real NVML call is exercised only on a GPU machine.
    budget = detect_budget(_meminfo(tmp_path, 1024), tmp_path / "none", gpu_build=lambda: True,
                           gpu_memory=lambda: (30 * GIB, 40 * GIB))
    assert budget.bytes == int(30 * GIB - GPU_RESERVE_FRACTION * 40 * GIB)
    assert "GPU" in budget.source


def test_gpu_build_without_nvml_budgets_the_host(tmp_path):
    budget = detect_budget(_meminfo(tmp_path, 1024 * 1024), tmp_path / "none", gpu_build=lambda: True,
                           gpu_memory=lambda: None)
    assert budget.bytes == int(GIB * AUTO_FRACTION) and "MemAvailable" in budget.source


def test_no_source_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="MEMORY_BUDGET_BYTES"):
        detect_budget(tmp_path / "missing", tmp_path / "none", gpu_build=_no_gpu)


def _llama_cpp_buffers(path: Path, n_ctx: int) -> tuple[int, int]:
    """Open a model and return (KV cache bytes, model bytes) as llama.cpp reports them."""
    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_gpu_layers=0, verbose=False)
        model_bytes = llama_cpp.llama_model_size(llm.model)
        llm.close()
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    kv_mib = [float(m) for m in re.findall(r"KV buffer size =\s+([\d.]+) MiB", "".join(lines))]
    assert kv_mib, "llama.cpp did not report its KV buffer"
    return round(sum(kv_mib) * MIB), model_bytes


@pytest.mark.parametrize("name", REAL_MODELS + ["tiny"])
@pytest.mark.parametrize("n_ctx", [512, 2048])
def test_header_arithmetic_matches_llama_cpp(make_model, tmp_path, name, n_ctx):
    path = make_model(tmp_path, "t.gguf", seed=5) if name == "tiny" else MODELS / name
    header = read_header(path)
    kv, model_bytes = _llama_cpp_buffers(path, n_ctx)
    assert kv_cache_bytes(header, n_ctx) == pytest.approx(kv, rel=0.01)  # llama.cpp prints MiB to 2 places
    assert header.tensor_bytes == model_bytes
    estimate = estimate_model_memory(header, n_ctx)
    assert estimate.total == estimate.weights + estimate.kv_cache + estimate.context


def test_rss_is_this_process():
    status = Path("/proc/self/status").read_text()
    vm_rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024
    assert process_rss_bytes() == pytest.approx(vm_rss, rel=0.05)


def test_logprobs_add_the_logits_table_llama_cpp_python_keeps(make_model, tmp_path):
    from inference_worker.engine import open_llama

    path = make_model(tmp_path, "t.gguf", seed=5)
    llm = open_llama(path, 512, 0, 1, 1, logits_all=True)
    try:
        table = llm.scores.nbytes  # one float32 row per context position, written as the context fills
    finally:
        llm.close()
    header = read_header(path)
    plain, with_logits = estimate_model_memory(header, 512), estimate_model_memory(header, 512, logits_all=True)
    assert plain.logits == 0 and with_logits.logits == table
    assert with_logits.total == plain.total + table
