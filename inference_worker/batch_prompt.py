"""What one batched generation needs before it reaches a slot: prompt tokens, stop strings, a sampler.

The prompt is built by llama-cpp-python's own high-level path, so a request gives the same tokens
and sampling settings as `Llama.create_completion` / `create_chat_completion` would: `HostLlama`
runs that path up to the point where it would start generating and records what it would feed
to `Llama.generate`.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping, Sequence

import llama_cpp
from llama_cpp import Llama

from inference_worker.memory import HOST_N_CTX
from model_swap.web import GenerationRequest

# The host Llama's own context is never used to generate: keep it as small as llama.cpp allows
# (it rounds the cells up to 256; one-token batches keep the compute buffer to one row of logits).
# That is about 6 MiB for each real model here, where n_batch=32 cost gemma 37 MiB.
HOST_N_BATCH = 1
UNSUPPORTED_SAMPLING = ("logits_processor",)  # what llama-cpp-python adds for logit_bias


class PromptTooLong(ValueError):
    """The prompt does not fit one slot's context."""

    def __init__(self, tokens: int, n_ctx: int):
        super().__init__(f"prompt is {tokens} tokens; a slot's context holds {n_ctx}")
        self.tokens = tokens
        self.n_ctx = n_ctx


@dataclass(frozen=True)
class BatchRequest:
    """One generation: a prompt (text, or tokens already rendered) or chat messages, and how to sample it.

    A field left None takes llama-cpp-python's default for that kind of request (so temperature
    is 0.8 for a prompt and 0.2 for a chat, as in create_completion / create_chat_completion).
    max_tokens None means: until the slot's context is full. grammar is a LlamaGrammar that
    constrains every sampled token, as create_completion's `grammar` does.
    """

    prompt: str | tuple[int, ...] | None = None
    messages: tuple[dict, ...] | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    grammar: object | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")

    def sampling_kwargs(self) -> dict:
        """The sampling settings that were given, as llama-cpp-python's keyword arguments."""
        skip = {"prompt", "messages", "max_tokens", "stop"}
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in skip and getattr(self, f.name) is not None}

    @classmethod
    def from_generation(cls, request: GenerationRequest, chat_tokens: Sequence[int] | None = None,
                        chat_stop: Sequence[str] = (), grammar: object | None = None) -> "BatchRequest":
        """The worker's parsed /infer body as a batched request.

        A chat arrives rendered by the worker's own template (chat_tokens, with the template's
        stop strings), exactly as the single-stream engine feeds it to create_completion.
        Every field of sampling_kwargs() is taken: a new one there fails here, not silently.
        """
        sampling = request.sampling_kwargs()
        max_tokens = sampling.pop("max_tokens")
        stop = tuple(dict.fromkeys((*chat_stop, *sampling.pop("stop", ()))))
        if chat_tokens is not None:
            return cls(prompt=tuple(chat_tokens), max_tokens=max_tokens, stop=stop, grammar=grammar, **sampling)
        return cls(prompt=request.prompt, messages=request.messages, max_tokens=max_tokens, stop=stop,
                   grammar=grammar, **sampling)


@dataclass(frozen=True)
class PreparedRequest:
    """A request as tokens, with its stop strings, token budget and sampler settings."""

    tokens: tuple[int, ...]
    stop: tuple[str, ...]
    max_tokens: int
    sampling: Mapping[str, object]  # Llama.generate's keyword arguments: temp, top_k, top_p, ...
    seed: int
    penalty_last_n: int


class _ReachedGenerate(Exception):
    """Raised from HostLlama.generate: the high-level path has built everything it needs."""

    def __init__(self, tokens: list[int], sampling: dict, seed: int):
        super().__init__("reached generate")
        self.tokens, self.sampling, self.seed = tokens, sampling, seed


class RepackChoiceLlama(Llama):
    """A Llama that can load its weights without llama.cpp's CPU repacking (Llama has no argument for it)."""

    def __init__(self, *args, repack_weights: bool = True, **kwargs):
        self._repack_weights = repack_weights
        super().__init__(*args, **kwargs)

    @property
    def model_params(self):
        """llama.cpp's model parameters (Llama.__init__ builds them, then loads the model with them)."""
        return self.__dict__["_model_params"]

    @model_params.setter
    def model_params(self, params) -> None:
        # CPU weight repacking ("extra buffer types") uses kernels whose rounding depends on how
        # many tokens are in a batch; turning it off keeps a stream's text independent of the
        # others in its batch (batch_invariant).
        params.use_extra_bufts = self._repack_weights
        self.__dict__["_model_params"] = params


class HostLlama(RepackChoiceLlama):
    """Holds the weights, tokenizer and chat template for a BatchedModel; never generates itself."""

    def __init__(self, path: Path, n_gpu_layers: int, repack_weights: bool = True):
        super().__init__(model_path=str(path), n_ctx=HOST_N_CTX, n_batch=HOST_N_BATCH, n_gpu_layers=n_gpu_layers,
                         n_threads=1, n_threads_batch=1, verbose=False, repack_weights=repack_weights)
        # create_completion compares the prompt with this Llama's own (tiny) context; prepare()
        # checks it against a slot's context instead.
        self._n_ctx = sys.maxsize
        # prepare() changes this Llama's seed and stop bookkeeping: one request at a time.
        self._prepare_lock = threading.Lock()
        self._stop: list[str] = []

    def prepare(self, request: BatchRequest, n_ctx: int) -> PreparedRequest:
        """Build tokens and sampler settings exactly as the high-level path would; PromptTooLong if it cannot fit."""
        with self._prepare_lock:
            try:
                if request.messages is not None:
                    chunks = self.create_chat_completion(list(request.messages), stream=True, stop=list(request.stop),
                                                         **request.sampling_kwargs())
                else:
                    prompt = request.prompt if isinstance(request.prompt, str) else list(request.prompt)
                    chunks = self.create_completion(prompt, stream=True, stop=list(request.stop),
                                                    **request.sampling_kwargs())
                next(iter(chunks))
            except _ReachedGenerate as reached:
                tokens, sampling, seed, stop = reached.tokens, reached.sampling, reached.seed, self._stop
            else:
                raise RuntimeError("llama-cpp-python finished a completion without reaching generate()")
        for name in UNSUPPORTED_SAMPLING:
            if sampling.get(name) is not None:
                raise ValueError(f"{name} is not supported by batched generation")
        if sampling.get("mirostat_mode"):
            raise ValueError("mirostat is not supported by batched generation")
        if not tokens:
            raise ValueError("the prompt is empty")
        if sampling.get("grammar") is not None:
            check_grammar(sampling["grammar"], self.model)
        if len(tokens) >= n_ctx:
            raise PromptTooLong(len(tokens), n_ctx)
        room = n_ctx - len(tokens)
        max_tokens = room if request.max_tokens is None or request.max_tokens <= 0 else min(request.max_tokens, room)
        # The chat template's own stopping rule fires on the token before the one just sampled,
        # which can only be an end-of-generation token, and those already end a stream.
        sampling.pop("stopping_criteria", None)
        return PreparedRequest(tuple(tokens), tuple(stop), max_tokens, sampling, seed, self.last_n_tokens_size)

    def create_completion(self, prompt, *args, **kwargs):
        """Record the stop strings (the chat handler adds its template's) on the way through."""
        stop = kwargs.get("stop") or []
        self._stop = [stop] if isinstance(stop, str) else list(stop)
        return super().create_completion(prompt, *args, **kwargs)

    def generate(self, tokens, **kwargs):
        """Stop the high-level path where it would start decoding, handing over what it built."""
        raise _ReachedGenerate(list(tokens), kwargs, self._seed)


def _grammar_sampler(grammar, model):
    vocab = llama_cpp.llama_model_get_vocab(model)
    return llama_cpp.llama_sampler_init_grammar(vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8"))


def check_grammar(grammar, model) -> None:
    """ValueError if llama.cpp cannot parse the grammar (checked on the caller's thread, not the decode loop's)."""
    sampler = _grammar_sampler(grammar, model)
    if not sampler:
        raise ValueError("llama.cpp could not parse the grammar")
    llama_cpp.llama_sampler_free(sampler)


def new_sampler(prepared: PreparedRequest, n_vocab: int, model=None):
    """A llama.cpp sampler chain in the order llama-cpp-python builds it; free it with llama_sampler_free.

    `model` (a llama_model pointer) is needed only for a request with a grammar."""
    s = prepared.sampling
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

    def add(sampler) -> None:
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    # This build's llama_sampler_init_penalties still takes n_vocab first (see its llama.h).
    add(llama_cpp.llama_sampler_init_penalties(n_vocab, prepared.penalty_last_n, s["repeat_penalty"],
                                               s["frequency_penalty"], s["presence_penalty"]))
    if s.get("grammar") is not None:  # after the penalties, before choosing, as llama-cpp-python does
        add(_grammar_sampler(s["grammar"], model))
    temp = s["temp"]
    if temp < 0:
        add(llama_cpp.llama_sampler_init_dist(prepared.seed))
    elif temp == 0:
        add(llama_cpp.llama_sampler_init_greedy())
    else:
        add(llama_cpp.llama_sampler_init_top_k(s["top_k"]))
        add(llama_cpp.llama_sampler_init_typical(s["typical_p"], 1))
        add(llama_cpp.llama_sampler_init_top_p(s["top_p"], 1))
        add(llama_cpp.llama_sampler_init_min_p(s["min_p"], 1))
        add(llama_cpp.llama_sampler_init_temp(temp))
        add(llama_cpp.llama_sampler_init_dist(prepared.seed))
    return chain


def kv_cache_bytes(metadata: Mapping[str, str], n_ctx: int, bytes_per_value: int = 2) -> int:
    """KV cache bytes llama.cpp allocates for `n_ctx` cells in all (f16 K and V, full-size SWA cache).

    Counts every layer, as llama.cpp does with its default swa_full. `metadata` is the GGUF's
    key/value header (llama_model_meta_* or gguf's reader, values as strings or numbers).
    """
    arch = metadata["general.architecture"]
    n_layer = int(metadata[f"{arch}.block_count"])
    n_head = int(metadata[f"{arch}.attention.head_count"])
    n_head_kv = int(metadata.get(f"{arch}.attention.head_count_kv", n_head))
    head = int(metadata[f"{arch}.embedding_length"]) // n_head
    k = int(metadata.get(f"{arch}.attention.key_length", head))
    v = int(metadata.get(f"{arch}.attention.value_length", head))
    return n_ctx * n_layer * n_head_kv * (k + v) * bytes_per_value


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))
