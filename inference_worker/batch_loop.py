"""The decode thread of a BatchedModel: the only user of its llama.cpp context.

It admits queued requests into free slots between steps, feeds every generating slot's last
token plus up to `prompt_chunk` prompt tokens to one llama_decode, samples each slot with its
own sampler chain, and removes a finished or closed slot's sequence from the KV cache.
See docs/architecture.md, "Batched decoding".
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
from collections import deque
from typing import Callable, Iterator

import llama_cpp

from inference_worker.batch_prompt import PreparedRequest, new_sampler
from inference_worker.batch_stream import BatchStats, GenerationFailed, ModelClosing, StepInfo, Stream
from inference_worker.batch_text import TextAssembler

log = logging.getLogger(__name__)


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


class DecodeLoop:
    """Owns a context (it frees it when it stops), the queue and the slots; one thread decodes."""

    def __init__(self, ctx, model, n_parallel: int, n_batch: int, prompt_chunk: int,
                 on_step: Callable[[StepInfo], None] | None, name: str):
        self.name, self.n_parallel = name, n_parallel
        # The Llama that owns the weights: held so that they outlive the context even if the
        # BatchedModel is dropped without close().
        self._model = model
        vocab = llama_cpp.llama_model_get_vocab(model.model)
        self._ctx, self._mem, self._vocab = ctx, llama_cpp.llama_get_memory(ctx), vocab
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._batch_capacity, self._prompt_chunk, self._on_step = n_batch, prompt_chunk, on_step
        self._piece_buf = ctypes.create_string_buffer(256)
        # Guards the queue, the slots and the counters; never held across llama_decode.
        self._cond = threading.Condition(threading.RLock())
        self._queue: deque[tuple[PreparedRequest, Stream]] = deque()
        self._slots: list[_Slot | None] = [None] * n_parallel
        self._admitted = 0
        self._prompt_only_last = False
        self._preparing = 0
        self._accepting = True
        self._stopping = False
        self._broken: str | None = None
        self._counts = {"steps": 0, "batch_tokens": 0, "last_tokens": 0, "last_sequences": 0, "prompt": 0,
                        "generated": 0}
        self._thread = threading.Thread(target=self._run, name=f"decode-{name}", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def admission(self) -> Iterator[Callable[[PreparedRequest], Stream]]:
        """Hold the door open while a request is prepared; yields the function that queues it."""
        with self._cond:
            self._check_open()
            self._preparing += 1
        try:
            yield self._enqueue
        finally:
            with self._cond:
                self._preparing -= 1
                self._cond.notify_all()

    def _enqueue(self, prepared: PreparedRequest) -> Stream:
        with self._cond:
            self._check_open()
            stream = Stream(len(prepared.tokens), self._wake)
            self._queue.append((prepared, stream))
            self._cond.notify_all()
            return stream

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

    def drain(self, timeout: float | None) -> bool:
        """Refuse new requests and wait for the admitted and queued ones; on timeout accept again, return False."""
        with self._cond:
            self._accepting = False
            if self._cond.wait_for(self._idle, timeout):
                return True
            self._accepting = self._broken is None
            return False

    def stop(self, timeout: float | None) -> None:
        """Drain (at most `timeout` s), fail what still runs, and wait for the thread to free the context."""
        with self._cond:
            self._accepting = False
            self._cond.wait_for(self._idle, timeout)
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()

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
                for _, stream in self._queue:
                    if stream.closed:
                        stream._end("cancelled")
                self._queue = deque(p for p in self._queue if not p[1].closed)
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
        sampler = new_sampler(prepared, self._n_vocab, self._model.model)
        self._slots[seq] = _Slot(seq, self._admitted, stream, prepared, sampler)

    def _step(self) -> None:
        """One llama_decode: a token for each generating slot, then prompt chunks in admission order."""
        slots = [s for s in self._slots if s is not None]
        prompting = sorted((s for s in slots if s.prompting), key=lambda s: s.order)
        # A step that can finish a prompt runs without the others' tokens, so a request joining
        # a busy batch waits for one small step, not a full one; never twice in a row, so
        # constant arrivals cannot stall the streams already generating.
        prompt_only = (not self._prompt_only_last and any(s.next_token is not None for s in slots)
                       and any(len(s.prepared.tokens) - s.n_past <= self._prompt_chunk for s in prompting))
        self._prompt_only_last = prompt_only
        n, in_batch = 0, set()
        for slot in slots:
            slot.logits_at = -1
            if slot.next_token is not None and not prompt_only:
                self._put_token(n, slot.next_token, slot.n_past, slot.seq, True)
                slot.logits_at, slot.n_past, slot.next_token, n = n, slot.n_past + 1, None, n + 1
                in_batch.add(slot.seq)
        generating = n
        budget = min(self._prompt_chunk, self._batch_capacity - n)
        for slot in prompting:
            tokens = slot.prepared.tokens
            take = min(budget, len(tokens) - slot.n_past)
            for i in range(slot.n_past, slot.n_past + take):
                self._put_token(n, tokens[i], i, slot.seq, i == len(tokens) - 1)
                n += 1
            slot.n_past += take
            budget -= take
            if take:
                in_batch.add(slot.seq)
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
        self._count_step(n, len(in_batch), n - generating, len(sampled), seconds)

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
        log.warning("[batch] llama_decode returned %d for %s; failing its %d streams",
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
