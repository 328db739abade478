"""One loaded model's pieces: a fair turn, llama.cpp opened with our settings, one generation."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Iterator

from model_swap.errors import ApiError
from model_swap.once import Once
from model_swap.web import GenerationRequest

MAX_BYTES_PER_TOKEN = 64  # far above any real tokenizer's average, so only hopeless prompts are cut short


class FairLock:
    """A lock granted in arrival order (threading.Lock makes no such promise)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def acquire(self) -> None:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while self._serving != ticket:
                self._cond.wait()

    def release(self) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()

    def waiting(self) -> int:
        """How many holders and waiters there are now."""
        with self._cond:
            return self._next_ticket - self._serving

    def __enter__(self) -> "FairLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def prepare_llama() -> None:
    """Import llama.cpp and initialise its backend now, at start, so these one-time costs are not
    counted in the first load's memory (and do not slow the first request)."""
    import llama_cpp

    llama_cpp.llama_backend_init()


def open_llama(path: Path, n_ctx: int, n_gpu_layers: int, n_threads: int, n_threads_batch: int):
    """Open a model with llama.cpp; the caller must close() it."""
    # Imported here so the package imports (and most tests run) quickly.
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=n_threads,
                 n_threads_batch=n_threads_batch, verbose=False)


def llama_model_bytes(llm) -> int | None:
    """The weights' size as llama.cpp reports it, or None for something that is not a Llama."""
    try:
        from llama_cpp import llama_model_size

        return int(llama_model_size(llm.model))
    except Exception:  # a test double, or a binding without the call
        return None


class Generation:
    """One request's turn on the model; release() is idempotent and ends the turn."""

    def __init__(self, llm, name: str, n_ctx: int, release: Callable[[], None]):
        self._llm = llm
        self.name = name
        self._n_ctx = n_ctx
        self._release = Once(release)
        self.prompt_tokens: int | None = None
        self.finish_reason: str | None = None

    def check_prompt(self, prompt: str) -> None:
        """Refuse a prompt that does not fit the context (llama.cpp would fail mid-response)."""
        data = prompt.encode("utf-8")
        # Tokenizing holds the model's turn: refuse without tokenizing what cannot possibly fit.
        if len(data) > self._n_ctx * MAX_BYTES_PER_TOKEN:
            raise ApiError(400, "prompt_too_long", f"prompt is {len(data)} bytes; the context holds {self._n_ctx} tokens")
        tokens = len(self._llm.tokenize(data, add_bos=True))
        if tokens >= self._n_ctx:
            raise ApiError(400, "prompt_too_long", f"prompt is {tokens} tokens; the context holds {self._n_ctx}")
        self.prompt_tokens = tokens

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """Yield text pieces as llama.cpp produces them; finish_reason is set when it ends."""
        kwargs = {"stream": True, **request.sampling_kwargs()}
        if request.messages is not None:
            chunks = self._llm.create_chat_completion(list(request.messages), **kwargs)
        else:
            chunks = self._llm.create_completion(request.prompt, **kwargs)
        try:
            for chunk in chunks:
                choice = chunk["choices"][0]
                text = choice["delta"].get("content") if "delta" in choice else choice["text"]
                self.finish_reason = choice.get("finish_reason") or self.finish_reason
                if text:
                    yield text
        finally:
            # Closing llama.cpp's generator stops decoding when the client went away.
            chunks.close()

    def release(self) -> None:
        """End the turn (idempotent)."""
        self._release()
