"""The caller's side of a batched generation: a Stream of text pieces, and the loop's counters."""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Callable, Iterator

_END = object()


class ModelClosing(RuntimeError):
    """The model is draining or closed and takes no new requests."""


class GenerationFailed(RuntimeError):
    """llama.cpp failed while decoding this stream, or the model was closed under it."""


class Stream:
    """One request's text as it is generated.

    Iterate for text pieces (whole UTF-8 characters). When iteration ends, finish_reason is
    "stop" (an end-of-generation token or a stop string), "length" (max_tokens, or the slot's
    context is full) or "cancelled" (closed early); a failure raises GenerationFailed instead.
    close() gives the slot back at the decode loop's next step; it is idempotent and safe from
    any thread.
    """

    def __init__(self, prompt_tokens: int, wake: Callable[[], None]):
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = wake
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._closed

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._events.get()
            if item is _END:
                self._events.put(_END)  # a second iteration ends at once too
                return
            if isinstance(item, BaseException):
                self._events.put(item)
                raise item
            yield item

    def text(self) -> str:
        """Wait for the whole text."""
        return "".join(self)

    def close(self) -> None:
        """Stop generating; the decode loop frees the slot and its KV cache at its next step."""
        if not self._closed:
            self._closed = True
            self._wake()

    # Called by the decode loop only.
    def _put(self, text: str) -> None:
        self._events.put(text)

    def _end(self, reason: str) -> None:
        self.finish_reason = reason
        self._events.put(_END)

    def _fail(self, err: BaseException) -> None:
        self._events.put(err)


@dataclass(frozen=True)
class BatchStats:
    """A snapshot of one model's decode loop, for /metrics."""

    n_parallel: int
    active: int  # slots holding a stream
    queued: int  # requests waiting for a slot
    steps: int  # llama_decode calls so far
    batch_tokens: int  # tokens decoded over all steps (prompt chunks and generated tokens)
    last_batch_tokens: int
    last_batch_sequences: int
    prompt_tokens: int  # prompt tokens evaluated so far
    tokens_generated: int


@dataclass(frozen=True)
class StepInfo:
    """What one llama_decode did; passed to BatchedModel's on_step callback."""

    tokens: int  # tokens in the batch
    sequences: int  # slots in the batch
    generated: int  # tokens sampled after it
    seconds: float  # time in llama_decode
