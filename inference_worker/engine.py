"""The loaded model: one llama.cpp context, used by one request at a time, in arrival order."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from inference_worker.chat_templates import ChatTemplate, choose_chat_template
from inference_worker.output_options import completion_kwargs, piece_logprobs
from model_swap.errors import ApiError
from model_swap.model_settings import ModelSettings
from model_swap.once import Once
from model_swap.web import GenerationRequest

log = logging.getLogger(__name__)
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


@dataclass(frozen=True)
class LoadResult:
    """What a load did."""

    name: str
    load_ms: float
    previous: str | None


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _open_llama(path: Path, n_ctx: int, n_gpu_layers: int, logits_all: bool = False):
    # Imported here so the package imports (and most tests run) quickly.
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, logits_all=logits_all, verbose=False)


class Piece(str):
    """A piece of generated text that also carries its tokens' logprobs, when they were asked for."""

    logprobs: list[dict] | None

    def __new__(cls, text: str, logprobs: list[dict] | None = None) -> "Piece":
        piece = super().__new__(cls, text)
        piece.logprobs = logprobs
        return piece


class Engine:
    """Wraps llama_cpp.Llama: load, unload (always close()), and stream; never serves another model."""

    def __init__(self, n_ctx: int, n_gpu_layers: int, open_model: Callable = _open_llama):
        self.n_ctx = n_ctx
        self.n_gpu_layers = n_gpu_layers
        self._open_model = open_model
        # Held by each generation for its whole stream and by every load and unload:
        # loads therefore drain the generations that arrived before them.
        self._turn = FairLock()
        self._llm = None
        self._name: str | None = None
        self._path: Path | None = None
        self._settings = ModelSettings()
        self._chat: ChatTemplate | None = None
        # Which file the loaded model came from: a model re-sent under the same name is loaded anew.
        self._identity: tuple[int, int, int] | None = None

    @property
    def loaded(self) -> str | None:
        """The loaded model's name, or None."""
        return self._name

    def load(self, name: str, path: Path, settings: ModelSettings = ModelSettings()) -> LoadResult:
        """Swap to `name` opened with `settings`; on failure the previous model is loaded again and the error raised."""
        with self._turn:
            previous, previous_path, previous_settings = self._name, self._path, self._settings
            if previous == name and self._identity == _file_identity(path) and self._settings == settings:
                return LoadResult(name, 0.0, previous)
            # Unload first: with more models than memory, two resident models may not fit.
            self._close_current()
            started = time.perf_counter()
            try:
                self._open(path, settings)
            except Exception as err:
                log.warning("[engine] load of %s failed: %s", name, err)
                restored = self._restore(previous, previous_path, previous_settings)
                raise ApiError(422, "load_failed",
                               f"llama.cpp could not load {name}: {err}"
                               + (f"; {previous} is loaded again" if restored else "")) from err
            self._name, self._path, self._identity = name, path, _file_identity(path)
            load_ms = (time.perf_counter() - started) * 1000
            log.info("[engine] loaded %s in %.1fms (previous=%s) chat_template=%s settings=%s", name, load_ms,
                     previous, self._chat.label, settings.to_json())
            return LoadResult(name, load_ms, previous)

    def _open(self, path: Path, settings: ModelSettings) -> None:
        """Open the model and pick its chat template; a template that cannot apply fails the load."""
        llm = self._open_model(path, settings.n_ctx or self.n_ctx,
                               self.n_gpu_layers if settings.n_gpu_layers is None else settings.n_gpu_layers,
                               settings.logprobs)
        try:
            self._chat = choose_chat_template(llm, settings.chat_template)
        except Exception:
            llm.close()
            raise
        self._llm, self._settings = llm, settings

    def _restore(self, name: str | None, path: Path | None, settings: ModelSettings) -> bool:
        if name is None or path is None:
            return False
        try:
            self._open(path, settings)
        except Exception:
            log.exception("[engine] could not reload previous model %s", name)
            return False
        self._name, self._path, self._identity = name, path, _file_identity(path)
        return True

    def unload(self, name: str | None = None) -> str | None:
        """Close the loaded model (only if it is `name`, when given); return what was unloaded."""
        with self._turn:
            if self._name is None or (name is not None and self._name != name):
                return None
            unloaded = self._name
            self._close_current()
            return unloaded

    def _close_current(self) -> None:
        if self._llm is None:
            return
        started = time.perf_counter()
        name = self._name
        try:
            self._llm.close()
        finally:
            self._llm, self._name, self._path, self._identity = None, None, None, None
            self._settings, self._chat = ModelSettings(), None
        log.info("[engine] unloaded %s in %.1fms", name, (time.perf_counter() - started) * 1000)

    def begin(self, model: str | None) -> "Generation":
        """Wait for this request's turn, then check the loaded model is the one asked for."""
        self._turn.acquire()
        try:
            if self._llm is None:
                raise ApiError(409, "model_not_loaded", "no model is loaded")
            if model is not None and model != self._name:
                raise ApiError(409, "model_not_loaded", f"{model} is not loaded (loaded: {self._name})")
        except ApiError:
            self._turn.release()
            raise
        return Generation(self._llm, self._name, self._settings.n_ctx or self.n_ctx, self._turn.release, self._chat,
                          self._settings.logprobs)

    def queue_depth(self) -> int:
        """Requests holding or waiting for the model."""
        return self._turn.waiting()


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
        kwargs: dict = {"max_tokens": request.max_tokens, "stream": True,
                        **completion_kwargs(request, self._logits_kept)}
        if request.temperature is not None:
            kwargs["temperature"] = request.temperature
        if request.messages is not None:
            if self._chat_tokens is None:
                self.check_messages(request.messages)
            # The chat is rendered here rather than by create_chat_completion, so its prompt is
            # counted and checked like a completion's and the template is the one chosen at load.
            chunks = self._llm.create_completion(self._chat_tokens, stop=list(self.chat.stop), **kwargs)
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
