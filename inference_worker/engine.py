"""One loaded model's pieces: a fair turn, llama.cpp opened with our settings, one generation."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Iterator

from inference_worker.chat_templates import ChatTemplate
from inference_worker.output_options import completion_kwargs, piece_logprobs
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


def open_llama(path: Path, n_ctx: int, n_gpu_layers: int, n_threads: int, n_threads_batch: int,
               logits_all: bool = False, repack_weights: bool = True, flash_attn: bool = False):
    """Open a model with llama.cpp; the caller must close() it. logits_all keeps every position's
    logits, which logprobs need (and which costs memory, so only models configured for it pay).
    repack_weights=False loads the weights as the batched engine does with BATCH_INVARIANT;
    flash_attn is FLASH_ATTN."""
    # Imported here so the package imports (and most tests run) quickly.
    from llama_cpp import Llama

    kwargs = dict(model_path=str(path), n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=n_threads,
                  n_threads_batch=n_threads_batch, logits_all=logits_all, flash_attn=flash_attn, verbose=False)
    if repack_weights:
        return Llama(**kwargs)
    from inference_worker.batch_prompt import RepackChoiceLlama

    return RepackChoiceLlama(**kwargs, repack_weights=False)


def llama_model_bytes(llm) -> int | None:
    """The weights' size as llama.cpp reports it, or None for something that is not a Llama."""
    try:
        from llama_cpp import llama_model_size

        return int(llama_model_size(llm.model))
    except Exception:  # a test double, or a binding without the call
        return None


class Piece(str):
    """A piece of generated text that also carries its tokens' logprobs, when they were asked for."""

    logprobs: list[dict] | None

    def __new__(cls, text: str, logprobs: list[dict] | None = None) -> "Piece":
        piece = super().__new__(cls, text)
        piece.logprobs = logprobs
        return piece


class Generation:
    """One request's turn on the model; release() is idempotent and ends the turn."""

    def __init__(self, llm, name: str, n_ctx: int, release: Callable[[], None], chat: ChatTemplate | None = None,
                 logits_kept: bool = False):
        self._llm = llm
        self.name = name
        self._n_ctx = n_ctx
        self._release = Once(release)
        self.chat = chat
        self._logits_kept = logits_kept
        self._chat_tokens: list[int] | None = None
        self.prompt_tokens: int | None = None
        self.finish_reason: str | None = None

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def count_tokens(self, prompt: str | None = None, messages: tuple[dict, ...] | None = None) -> int:
        """The prompt's tokens as a generation would feed them: a chat rendered with the model's template."""
        if messages is not None:
            return len(self.chat.render(self._llm, messages))
        return len(self._llm.tokenize(prompt.encode("utf-8"), add_bos=True))

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

    def check_messages(self, messages: tuple[dict, ...]) -> None:
        """Render the chat with the model's template; refuse a conversation that does not fit the context."""
        size = sum(len(m["content"].encode("utf-8")) for m in messages)
        if size > self._n_ctx * MAX_BYTES_PER_TOKEN:  # as for prompts: do not tokenize what cannot fit
            raise ApiError(400, "prompt_too_long", f"the chat is {size} bytes; the context holds {self._n_ctx} tokens")
        tokens = self.chat.render(self._llm, messages)
        if len(tokens) >= self._n_ctx:
            raise ApiError(400, "prompt_too_long", f"the chat is {len(tokens)} tokens; the context holds {self._n_ctx}")
        self._chat_tokens, self.prompt_tokens = tokens, len(tokens)

    def stream(self, request: GenerationRequest) -> Iterator[Piece]:
        """Yield text pieces as llama.cpp produces them; finish_reason is set when it ends."""
        kwargs = {"stream": True, **request.sampling_kwargs(), **completion_kwargs(request, self._logits_kept)}
        if request.messages is not None:
            if self._chat_tokens is None:
                self.check_messages(request.messages)
            # The chat is rendered here rather than by create_chat_completion, so its prompt is
            # counted and checked like a completion's and the template is the one chosen at load.
            # The template's turn markers and the request's own stop strings, each once.
            stop = list(dict.fromkeys((*self.chat.stop, *request.stop)))
            if stop:
                kwargs["stop"] = stop
            chunks = self._llm.create_completion(self._chat_tokens, **kwargs)
        else:
            chunks = self._llm.create_completion(request.prompt, **kwargs)
        try:
            for chunk in chunks:
                choice = chunk["choices"][0]
                self.finish_reason = choice.get("finish_reason") or self.finish_reason
                logprobs = piece_logprobs(choice.get("logprobs"), request.logprobs)
                if choice["text"] or logprobs:
                    yield Piece(choice["text"], logprobs)
        finally:
            # Closing llama.cpp's generator stops decoding when the client went away.
            chunks.close()

    def release(self) -> None:
        """End the turn (idempotent)."""
        self._release()
