"""Continuous batching: several streams on one loaded model, decoded together by one thread.

A BatchedModel holds the model (a HostLlama) and one llama.cpp context with `n_parallel`
sequences (slots) of `n_ctx_per_slot` cells each, which it hands to a DecodeLoop: that loop's
thread is the only code that touches the context. Callers' threads only prepare prompts
(tokenizing through the model's vocabulary, as llama-server does) and read Streams.
See docs/architecture.md, "Batched decoding".
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

import llama_cpp

from inference_worker.batch_loop import DecodeLoop
from inference_worker.batch_prompt import BatchRequest, HostLlama, kv_cache_bytes, usable_cores
from inference_worker.batch_stream import BatchStats, StepInfo, Stream

log = logging.getLogger(__name__)
DEFAULT_PROMPT_CHUNK = 256
MAX_UBATCH = 512


class BatchedModel:
    """One model serving up to `n_parallel` streams at once; requests beyond them wait in arrival order.

    n_threads defaults to every usable core (llama-cpp-python's own default is half of them).
    prompt_chunk bounds the prompt tokens evaluated per step, so a long prompt delays the
    streams already generating by one chunk's time per step, not by the whole prompt's.
    flash_attn (llama-server's default too) was 8% faster for one SmolLM2 stream here and 16%
    for eight; Llama() opens its context without it, so flash_attn=False gives exactly today's
    engine numbers.
    batch_invariant=True loads the weights without llama.cpp's CPU repacking and turns flash
    attention off: slower, but a greedy stream's text then does not depend on the batch it
    shares (see docs/architecture.md).
    on_step is called on the decode thread after each llama_decode (keep it cheap).
    """

    def __init__(self, path: Path, *, n_ctx_per_slot: int = 2048, n_parallel: int = 4, n_threads: int | None = None,
                 n_threads_batch: int | None = None, n_gpu_layers: int = -1,
                 prompt_chunk: int = DEFAULT_PROMPT_CHUNK, batch_invariant: bool = False, flash_attn: bool = True,
                 on_step: Callable[[StepInfo], None] | None = None, name: str | None = None):
        if n_parallel < 1 or n_ctx_per_slot < 16 or prompt_chunk < 1:
            raise ValueError("n_parallel and prompt_chunk must be positive and n_ctx_per_slot at least 16")
        started = time.perf_counter()
        self.name = name or Path(path).name
        self.n_parallel = n_parallel
        n_threads = n_threads or usable_cores()
        self._host = HostLlama(Path(path), n_gpu_layers, repack_weights=not batch_invariant)
        try:
            # llama.cpp's CPU flash attention rounds differently for different batches too (gemma, here).
            ctx, n_batch = self._open_context(n_ctx_per_slot, prompt_chunk, n_threads, n_threads_batch or n_threads,
                                              flash_attn and not batch_invariant)
            try:
                # Each sequence gets its own n_ctx / n_seq_max cells (kv_unified is off).
                self.n_ctx_per_slot = llama_cpp.llama_n_ctx_seq(ctx)
                self._loop = DecodeLoop(ctx, self._host, n_parallel, n_batch, prompt_chunk, on_step, self.name)
            except BaseException:
                llama_cpp.llama_free(ctx)
                raise
        except BaseException:
            self._host.close()
            raise
        self._close_lock = threading.Lock()
        self._closed = False
        log.info("[batch] loaded %s: %d slots x %d tokens, KV cache %.1f MiB, in %.1fms", self.name, n_parallel,
                 self.n_ctx_per_slot, self.kv_cache_bytes / (1 << 20), (time.perf_counter() - started) * 1000)

    def _open_context(self, n_ctx_per_slot: int, prompt_chunk: int, n_threads: int, n_threads_batch: int,
                      flash_attn: bool):
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx_per_slot * self.n_parallel
        params.n_seq_max = self.n_parallel
        params.n_batch = self.n_parallel + prompt_chunk
        params.n_ubatch = min(params.n_batch, MAX_UBATCH)
        params.n_threads, params.n_threads_batch = n_threads, n_threads_batch
        # AUTO uses flash attention where the backend has it, as llama-server does by default;
        # Llama() turns it off unless asked (flash_attn=True gives the high-level path's numbers).
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        ctx = llama_cpp.llama_init_from_model(self._host.model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {params.n_ctx} tokens")
        return ctx, params.n_batch

    @property
    def host(self) -> HostLlama:
        """The Llama holding the weights, tokenizer and metadata (never used to generate)."""
        return self._host

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of KV cache this model's context holds: all slots, n_parallel x n_ctx_per_slot cells."""
        return kv_cache_bytes(self._host.metadata, self.n_ctx_per_slot * self.n_parallel)

    def submit(self, request: BatchRequest) -> Stream:
        """Queue a request; raise PromptTooLong, ValueError, ModelClosing or GenerationFailed at once."""
        with self._loop.admission() as enqueue:
            return enqueue(self._host.prepare(request, self.n_ctx_per_slot))

    def stats(self) -> BatchStats:
        """Counters for /metrics: slots in use, requests waiting, steps, tokens."""
        return self._loop.stats()

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests and wait for the admitted and queued ones; on timeout accept again, return False."""
        return self._loop.drain(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Drain (at most `timeout` s), fail what still runs, free the context, then the model."""
        with self._close_lock:  # a second caller returns once the first has freed everything
            if self._closed:
                return
            started = time.perf_counter()
            self._loop.stop(timeout)
            self._host.close()  # after the context: llama.cpp frees a context before its model
            self._closed = True
            log.info("[batch] unloaded %s in %.1fms", self.name, (time.perf_counter() - started) * 1000)

    def __enter__(self) -> "BatchedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
