"""Continuous batching: several streams on one loaded model, decoded together by one thread.

A BatchedModel owns one llama.cpp context with `n_parallel` sequences (slots) of
`n_ctx_per_slot` cells each. Its decode thread is the only code that touches that context: it
admits queued requests into free slots between steps, feeds every generating slot's last token
plus up to `prompt_chunk` prompt tokens to one llama_decode, samples each slot with its own
sampler chain, and removes a finished or closed slot's sequence from the KV cache. Other threads
only prepare prompts (tokenizing through the model's vocabulary, as llama-server does) and read
Streams. See docs/architecture.md, "Batched decoding".
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

import llama_cpp

from inference_worker.batch_prompt import (BatchRequest, HostLlama, PreparedRequest, kv_cache_bytes, new_sampler,
                                           usable_cores)
from inference_worker.batch_stream import BatchStats, GenerationFailed, ModelClosing, StepInfo, Stream
from inference_worker.batch_text import TextAssembler

log = logging.getLogger(__name__)
DEFAULT_PROMPT_CHUNK = 256
MAX_UBATCH = 512


class _Slot:
    """A stream admitted to a sequence of the context."""

    def __init__(self, seq: int, order: int, stream: Stream, prepared: PreparedRequest, sampler):
        self.seq, self.order, self.stream, self.prepared, self.sampler = seq, order, stream, prepared, sampler
        self.text = TextAssembler(prepared.stop)
        self.n_past = 0  # this sequence's tokens in the KV cache
        self.next_token: int | None = None  # sampled, not yet decoded
        self.logits_at = -1  # where this slot's logits are in the current batch

    @property
    def prompting(self) -> bool:
        return self.n_past < len(self.prepared.tokens)


class BatchedModel:
    """One model serving up to `n_parallel` streams at once; requests beyond them wait in arrival order.

    n_threads defaults to every usable core (llama-cpp-python's own default is half of them).
    prompt_chunk bounds the prompt tokens evaluated per step, so a long prompt delays the
    streams already generating by one chunk's time per step, not by the whole prompt's.
    flash_attn (llama-server's default too) is faster on this CPU by about a third; Llama()
    opens its context without it, so flash_attn=False gives exactly today's engine numbers.
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
        self._prompt_chunk = prompt_chunk
        self._on_step = on_step
        self._host = HostLlama(Path(path), n_gpu_layers, repack_weights=not batch_invariant)
        # llama.cpp's CPU flash attention rounds differently for different batches too (gemma, here).
        flash_attn = flash_attn and not batch_invariant
        try:
            self._open_context(n_ctx_per_slot, n_threads or usable_cores(), n_threads_batch or n_threads or usable_cores(),
                               flash_attn)
        except BaseException:
            self._host.close()
            raise
        self._vocab = llama_cpp.llama_model_get_vocab(self._host.model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._piece_buf = ctypes.create_string_buffer(256)
        self._cond = threading.Condition(threading.RLock())
        self._queue: deque[tuple[PreparedRequest, Stream]] = deque()
        self._slots: list[_Slot | None] = [None] * n_parallel
        self._admitted = 0
        self._preparing = 0
        self._accepting = True
        self._stopping = False
        self._broken: str | None = None
        self._counts = {"steps": 0, "batch_tokens": 0, "last_tokens": 0, "last_sequences": 0, "prompt": 0,
                        "generated": 0}
        self._close_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"decode-{self.name}", daemon=True)
        self._thread.start()
        log.info("[batch] loaded %s: %d slots x %d tokens, KV cache %.1f MiB, in %.1fms", self.name, n_parallel,
                 self.n_ctx_per_slot, self.kv_cache_bytes / (1 << 20), (time.perf_counter() - started) * 1000)

    def _open_context(self, n_ctx_per_slot: int, n_threads: int, n_threads_batch: int, flash_attn: bool) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx_per_slot * self.n_parallel
        params.n_seq_max = self.n_parallel
        params.n_batch = self.n_parallel + self._prompt_chunk
        params.n_ubatch = min(params.n_batch, MAX_UBATCH)
        params.n_threads, params.n_threads_batch = n_threads, n_threads_batch
        # AUTO uses flash attention where the backend has it, as llama-server does by default;
        # Llama() turns it off unless asked (flash_attn=True gives the high-level path's numbers).
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self._ctx = llama_cpp.llama_init_from_model(self._host.model, params)
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {params.n_ctx} tokens")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        # Each sequence gets its own stream of n_ctx / n_seq_max cells (kv_unified is off).
        self.n_ctx_per_slot = llama_cpp.llama_n_ctx_seq(self._ctx)
        self._batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        self._batch_capacity = params.n_batch

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of KV cache this model's context holds: all slots, n_parallel x n_ctx_per_slot cells."""
        return kv_cache_bytes(self._host.metadata, self.n_ctx_per_slot * self.n_parallel)

    def submit(self, request: BatchRequest) -> Stream:
        """Queue a request; raise PromptTooLong, ValueError, ModelClosing or GenerationFailed at once."""
        with self._cond:
            self._check_open()
            self._preparing += 1
        try:
            prepared = self._host.prepare(request, self.n_ctx_per_slot)
            with self._cond:
                self._check_open()
                stream = Stream(len(prepared.tokens), self._wake)
                self._queue.append((prepared, stream))
                self._cond.notify_all()
                return stream
        finally:
            with self._cond:
                self._preparing -= 1
                self._cond.notify_all()

    def _check_open(self) -> None:
        if self._broken is not None:
            raise GenerationFailed(self._broken)
        if not self._accepting:
            raise ModelClosing(f"{self.name} is being unloaded")

    def stats(self) -> BatchStats:
        """Counters for /metrics."""
        with self._cond:
            c = self._counts
            return BatchStats(self.n_parallel, sum(s is not None for s in self._slots), len(self._queue), c["steps"],
                              c["batch_tokens"], c["last_tokens"], c["last_sequences"], c["prompt"], c["generated"])

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests and wait for the admitted and queued ones; on timeout accept again, return False."""
        with self._cond:
            self._accepting = False
            if self._cond.wait_for(self._idle, timeout):
                return True
            self._accepting = self._broken is None
            return False

    def close(self, timeout: float | None = None) -> None:
        """Drain (at most `timeout` s), fail what still runs, stop the decode thread, free the context and model."""
        with self._close_lock:  # a second caller returns once the first has freed everything
            if not self._closed:
                self._shut_down(timeout)
                self._closed = True

    def __enter__(self) -> "BatchedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _shut_down(self, timeout: float | None) -> None:
        started = time.perf_counter()
        with self._cond:
            self._accepting = False
            self._cond.wait_for(self._idle, timeout)
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
        self._host.close()  # after the context: llama.cpp frees a context before its model
        log.info("[batch] unloaded %s in %.1fms", self.name, (time.perf_counter() - started) * 1000)

    def _idle(self) -> bool:
        return self._preparing == 0 and not self._queue and all(s is None for s in self._slots)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # Everything below runs on the decode thread.

    def _run(self) -> None:
        try:
            while self._next_round():
                self._step()
        except Exception:
            log.exception("[batch] decode loop for %s failed", self.name)
            self._broken = "the decode loop failed; see the worker log"
            self._fail_everything(self._broken)
        finally:
            self._free_context()

    def _next_round(self) -> bool:
        """Free closed slots and admit waiting requests; block while there is nothing to decode."""
        with self._cond:
            while True:
                for slot in [s for s in self._slots if s is not None and s.stream.closed]:
                    self._release(slot)
                    slot.stream._end("cancelled")
                for prepared, stream in [p for p in self._queue if p[1].closed]:
                    self._queue.remove((prepared, stream))
                    stream._end("cancelled")
                if self._stopping:
                    self._fail_everything(f"{self.name} was unloaded")
                    return False
                while self._queue and None in self._slots:
                    self._admit(*self._queue.popleft())
                if any(s is not None for s in self._slots):
                    return True
                self._cond.notify_all()  # drain() may be waiting for this idle moment
                self._cond.wait()

    def _admit(self, prepared: PreparedRequest, stream: Stream) -> None:
        seq = self._slots.index(None)
        self._admitted += 1
        self._slots[seq] = _Slot(seq, self._admitted, stream, prepared, new_sampler(prepared, self._n_vocab))

    def _step(self) -> None:
        """One llama_decode: a token for each generating slot, then prompt chunks in admission order."""
        slots = [s for s in self._slots if s is not None]
        n = 0
        for slot in slots:
            slot.logits_at = -1
            if slot.next_token is not None:
                self._put_token(n, slot.next_token, slot.n_past, slot.seq, True)
                slot.logits_at, slot.n_past, slot.next_token, n = n, slot.n_past + 1, None, n + 1
        generating = n
        budget = min(self._prompt_chunk, self._batch_capacity - n)
        for slot in sorted((s for s in slots if s.prompting), key=lambda s: s.order):
            tokens = slot.prepared.tokens
            take = min(budget, len(tokens) - slot.n_past)
            for i in range(slot.n_past, slot.n_past + take):
                self._put_token(n, tokens[i], i, slot.seq, i == len(tokens) - 1)
                n += 1
            slot.n_past += take
            budget -= take
            if not slot.prompting:
                slot.logits_at = n - 1
        self._batch.n_tokens = n
        started = time.perf_counter()
        rc = llama_cpp.llama_decode(self._ctx, self._batch)
        seconds = time.perf_counter() - started
        if rc != 0:
            self._decode_failed(rc, slots)
            return
        sampled = [s for s in slots if s.logits_at >= 0]
        for slot in sampled:
            self._accept(slot, llama_cpp.llama_sampler_sample(slot.sampler, self._ctx, slot.logits_at))
        self._count_step(n, len(slots), n - generating, len(sampled), seconds)

    def _put_token(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self._batch
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
        b.seq_id[i][0] = seq

    def _accept(self, slot: _Slot, token: int) -> None:
        """Handle a sampled token in the order llama-cpp-python's create_completion does."""
        stream = slot.stream
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._finish(slot, "stop")
            return
        stream.completion_tokens += 1
        text = slot.text.feed(self._piece(token))
        if text:
            stream._put(text)
        if slot.text.stopped:
            self._finish(slot, "stop")
        elif stream.completion_tokens >= slot.prepared.max_tokens:
            self._finish(slot, "length")
        else:
            slot.next_token = token

    def _piece(self, token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        if n < 0:
            self._piece_buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        return self._piece_buf.raw[:n]

    def _finish(self, slot: _Slot, reason: str) -> None:
        rest = slot.text.finish()
        if rest:
            slot.stream._put(rest)
        self._release(slot)  # before the stream ends, so its reader sees the slot free
        slot.stream._end(reason)

    def _release(self, slot: _Slot) -> None:
        """Remove the slot's sequence from the KV cache and free its sampler."""
        llama_cpp.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
        llama_cpp.llama_sampler_free(slot.sampler)
        with self._cond:
            self._slots[slot.seq] = None
            self._cond.notify_all()

    def _decode_failed(self, rc: int, slots: list[_Slot]) -> None:
        log.warning("[batch] llama_decode returned %d for %s; failing the %d streams in that batch",
                    rc, self.name, len(slots))
        for slot in slots:
            self._release(slot)
            slot.stream._fail(GenerationFailed(f"llama_decode returned {rc}"))

    def _count_step(self, tokens: int, sequences: int, prompt: int, generated: int, seconds: float) -> None:
        with self._cond:
            c = self._counts
            c["steps"] += 1
            c["batch_tokens"] += tokens
            c["last_tokens"], c["last_sequences"] = tokens, sequences
            c["prompt"] += prompt
            c["generated"] += generated
        if self._on_step is not None:
            try:
                self._on_step(StepInfo(tokens, sequences, generated, seconds))
            except Exception:
                log.exception("[batch] on_step callback failed")

    def _fail_everything(self, why: str) -> None:
        with self._cond:
            self._accepting = False
            for slot in [s for s in self._slots if s is not None]:
                self._release(slot)
                slot.stream._fail(GenerationFailed(why))
            while self._queue:
                self._queue.popleft()[1]._fail(GenerationFailed(why))
            self._cond.notify_all()

    def _free_context(self) -> None:
        for slot in [s for s in self._slots if s is not None]:
            llama_cpp.llama_sampler_free(slot.sampler)
            self._slots[slot.seq] = None
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        self._ctx = None
