"""Memory arithmetic for resident models: the estimate from a GGUF header, RSS, and the budget."""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from model_swap.gguf import GgufHeader, LongArray

log = logging.getLogger(__name__)
MIB = 1 << 20
KV_ELEMENT_BYTES = 2  # llama.cpp keeps K and V in f16 unless told otherwise
KV_CELL_PADDING = 256  # llama.cpp rounds the context's cells up to this
LOGIT_BYTES = 4  # llama-cpp-python keeps logits as float32
# What a llama.cpp context adds beyond weights and KV cache, as resident memory right after the
# load, calibrated on SmolLM2, Gemma 3 and the tiny test models (docs/architecture.md has the
# table): a fixed part (threadpool, graph metadata, the touched start of the compute buffer) and
# a part per vocabulary token (the vocabulary's tables, logits rows, repacked output weights).
CONTEXT_FIXED_BYTES = 3 * MIB
CONTEXT_BYTES_PER_VOCAB_TOKEN = 256
# A batched model's host Llama (batch_prompt.HostLlama) keeps a context of its own that it never
# generates with, as small as llama.cpp allows (it rounds the cells up to KV_CELL_PADDING).
HOST_N_CTX = 32
AUTO_FRACTION = 0.8  # of the memory available at start: the rest is for the OS, Python and prompts
GPU_RESERVE_FRACTION = 0.1  # of the device's total memory, kept for other processes and drivers


@dataclass(frozen=True)
class MemoryEstimate:
    """A model's expected resident size before loading, by part."""

    weights: int
    kv_cache: int
    context: int
    logits: int = 0  # every position's logits, kept only for a model loaded with logprobs

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.context + self.logits


def _per_layer(value, n_layer: int) -> list[int]:
    """An architecture key that is one number for every layer or a list with one per layer."""
    if isinstance(value, list):
        return [int(v) for v in value[:n_layer]]
    return [int(value)] * n_layer


def kv_cache_bytes(header: GgufHeader, n_ctx: int) -> int:
    """layers × KV heads × (key + value head size) × cells × f16, from the architecture's keys."""
    n_layer = header.arch_value("block_count")
    n_head = header.arch_value("attention.head_count")
    n_embd = header.arch_value("embedding_length")
    if not isinstance(n_layer, int) or n_head is None:
        return 0  # not an attention model (a recurrent one keeps a small state instead)
    heads = _per_layer(n_head, n_layer)
    kv_heads = _per_layer(header.arch_value("attention.head_count_kv", n_head), n_layer)
    cells = -(-n_ctx // KV_CELL_PADDING) * KV_CELL_PADDING
    total = 0
    for h, h_kv in zip(heads, kv_heads):
        head_size = n_embd // h if h and isinstance(n_embd, int) else 0
        k = header.arch_value("attention.key_length", head_size)
        v = header.arch_value("attention.value_length", head_size)
        total += h_kv * (k + v)
    return total * cells * KV_ELEMENT_BYTES


def vocabulary_size(header: GgufHeader) -> int:
    """How many tokens the model's vocabulary has."""
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, LongArray):
        return tokens.length
    if isinstance(tokens, list):
        return len(tokens)
    size = header.arch_value("vocab_size", 0)
    return size if isinstance(size, int) else 0


def estimate_model_memory(header: GgufHeader, n_ctx: int, logits_all: bool = False,
                          n_parallel: int = 1) -> MemoryEstimate:
    """Weights at their quantization + KV cache for n_parallel slots of n_ctx + the context's own
    allowance, and with logits_all the n_ctx × vocabulary table of float32 logits that fills as the
    context does."""
    vocab = vocabulary_size(header)
    context = CONTEXT_FIXED_BYTES + CONTEXT_BYTES_PER_VOCAB_TOKEN * vocab
    # Untouched right after the load (numpy leaves it unwritten), so it is charged before it is
    # resident: a model used for logprobs must not push the others past the budget later.
    logits = n_ctx * vocab * LOGIT_BYTES if logits_all else 0
    # Each slot has its own n_ctx cells (kv_unified off), each rounded up as llama.cpp does.
    kv = n_parallel * kv_cache_bytes(header, n_ctx)
    if n_parallel > 1:  # a batched model: the host Llama's tiny context too
        kv += kv_cache_bytes(header, HOST_N_CTX)
    return MemoryEstimate(header.tensor_bytes, kv, context, logits)


def process_rss_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def return_freed_memory() -> None:
    """Give the heap's freed pages back to the OS (glibc keeps them otherwise, and a closed
    model's hundreds of MB would stay in RSS and make the next load's RSS change meaningless)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim this way


@dataclass(frozen=True)
class Budget:
    """How many bytes resident models may take, and how that figure was chosen."""

    bytes: int
    source: str


def _meminfo_available(path: Path) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def host_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The host's MemAvailable: what the kernel could give a new allocation without swapping."""
    return _meminfo_available(meminfo)


def _cgroup_available(root: Path) -> int | None:
    """The cgroup's limit less its usage (v2, else v1); None without a limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit = _read_int(root / limit_file)
        # v1 reports "no limit" as a huge number (a page-rounded LONG_MAX).
        if limit is not None and limit < 1 << 60:
            return max(0, limit - (_read_int(root / usage_file) or 0))
    return None


def _gpu_free_bytes() -> tuple[int, int] | None:
    """(free, total) of GPU 0 through NVML, if nvidia-ml-py and a device are there."""
    try:
        import pynvml  # optional: nvidia-ml-py, only useful with a GPU build of llama.cpp
    except ImportError:
        log.warning("a GPU build of llama.cpp without nvidia-ml-py: budgeting host memory instead")
        return None
    try:
        pynvml.nvmlInit()
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0))
            return int(info.free), int(info.total)
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as err:
        log.warning("NVML could not read GPU memory (%s): budgeting host memory instead", err)
        return None


def gpu_memory_usage() -> list[dict] | None:
    """Used, free and total bytes of each GPU through NVML; None without nvidia-ml-py or a device."""
    try:
        import pynvml  # optional: the gpu extra
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None  # no driver or no device: nothing to report, and nothing is made up
    try:
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
            devices.append({"index": index, "used_bytes": int(info.used), "free_bytes": int(info.free),
                            "total_bytes": int(info.total)})
        return devices or None
    except pynvml.NVMLError as err:
        log.warning("NVML could not read GPU memory: %s", err)
        return None
    finally:
        pynvml.nvmlShutdown()


def _gpu_build() -> bool:
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:  # no llama_cpp, or a build without the call: budget the host
        return False


def detect_budget(meminfo: Path = Path("/proc/meminfo"), cgroup_root: Path = Path("/sys/fs/cgroup"),
                  gpu_build: Callable[[], bool] = _gpu_build,
                  gpu_memory: Callable[[], tuple[int, int] | None] = _gpu_free_bytes) -> Budget:
    """The automatic budget: GPU free memory less a reserve on a GPU build, else 80% of the host
    memory available now (MemAvailable or the cgroup's room, whichever is lower)."""
    if gpu_build():
        gpu = gpu_memory()
        if gpu is not None:
            free, total = gpu
            budget = max(0, int(free - GPU_RESERVE_FRACTION * total))
            return Budget(budget, f"auto: GPU 0 free {free} bytes less {GPU_RESERVE_FRACTION:.0%} of its {total}")
    candidates = {name: value for name, value in (("MemAvailable", _meminfo_available(meminfo)),
                                                  ("cgroup limit less usage", _cgroup_available(cgroup_root)))
                  if value is not None}
    if not candidates:
        raise RuntimeError("cannot tell how much memory is available: set MEMORY_BUDGET_BYTES")
    name, available = min(candidates.items(), key=lambda item: item[1])
    return Budget(int(available * AUTO_FRACTION),
                  f"auto: {AUTO_FRACTION:.0%} of {available} bytes available ({name})")
