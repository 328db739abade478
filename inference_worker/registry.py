"""The models resident in memory, each a record with its own turn, within a memory budget.

Locks (docs/architecture.md, "Threads and locks", says why):
- `_cond` guards the dict of records and every record's counters and flags; it is held only
  for bookkeeping, never across a llama.cpp call or while waiting for a turn.
- `_lifecycle` lets one llama.cpp constructor or close() run at a time; the budget check and
  the insertion of the new record happen under it, so two loads never share the last bytes.
- each record's `turn` is held by one generation of that model for its whole stream, on the
  single-stream engine; a batched model (N_PARALLEL > 1) has no turn: its decode loop admits
  requests into slots (inference_worker/batch_loop.py) and `active` counts them until released.
Order: `_lifecycle` before `_cond`; a turn is never held while taking `_lifecycle`.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from inference_worker.batch_generation import BatchedGeneration
from inference_worker.batch_stream import StepInfo
from inference_worker.batching import BatchedModel
from inference_worker.chat_templates import ChatTemplate, choose_chat_template
from inference_worker.engine import FairLock, Generation, llama_model_bytes, open_llama
from inference_worker.memory import (Budget, MemoryEstimate, estimate_model_memory, process_rss_bytes,
                                     return_freed_memory)
from model_swap.errors import ApiError
from model_swap.gguf import GgufError, read_header
from model_swap.model_settings import ModelSettings

log = logging.getLogger(__name__)
MAX_REMEMBERED_ESTIMATES = 256


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


@dataclass(eq=False)
class LoadedModel:
    """One resident model (like Ollama's runnerRef): the Llama, its turn, its memory and its use."""

    name: str
    identity: tuple[int, int, int] | None  # which file it came from: a re-sent file is loaded anew
    llm: object  # a llama_cpp.Llama, or a BatchedModel
    estimate: MemoryEstimate
    measured_bytes: int  # the process's RSS change across the load
    llama_model_bytes: int | None
    loaded_at: float
    last_used: float
    settings: ModelSettings  # what the store asked for (the models config); a change reloads it
    n_ctx: int  # the context it was opened with: its own setting, else the worker's N_CTX
    chat: ChatTemplate  # chosen at load, so every chat of this model is rendered the same way
    turn: FairLock = field(default_factory=FairLock)
    active: int = 0
    waiting: int = 0
    unload_requests: int = 0  # unloads draining it now; while any, new generations are refused

    @property
    def unloading(self) -> bool:
        return self.unload_requests > 0

    @property
    def batched(self) -> BatchedModel | None:
        return self.llm if isinstance(self.llm, BatchedModel) else None

    @property
    def busy(self) -> bool:
        return self.active + self.waiting > 0

    @property
    def charged_bytes(self) -> int:
        """What it counts against the budget: the larger of estimate and measurement."""
        return max(self.estimate.total, self.measured_bytes)

    def to_json(self) -> dict:
        return {"name": self.name, "memory_bytes": self.measured_bytes, "estimated_bytes": self.estimate.total,
                "loaded_at": self.loaded_at, "last_used": self.last_used, "active": self.active,
                "waiting": self.waiting, "unloading": self.unloading,
                "estimate": {"weights_bytes": self.estimate.weights, "kv_cache_bytes": self.estimate.kv_cache,
                             "context_bytes": self.estimate.context, "logits_bytes": self.estimate.logits},
                "llama_model_bytes": self.llama_model_bytes, "n_ctx": self.n_ctx, "chat_template": self.chat.label,
                "settings": self.settings.to_json(), **self._slots_json()}

    def _slots_json(self) -> dict:
        batched = self.batched
        if batched is None:
            return {"n_parallel": 1}
        stats = batched.stats()
        return {"n_parallel": stats.n_parallel, "slots": {"active": stats.active, "queued": stats.queued}}


@dataclass(frozen=True)
class LoadResult:
    """What a load did."""

    name: str
    load_ms: float
    already_loaded: bool
    memory_bytes: int
    estimated_bytes: int


@dataclass(frozen=True)
class LlamaSettings:
    """How every model is opened unless its own ModelSettings say otherwise."""

    n_ctx: int
    n_gpu_layers: int
    n_threads: int
    n_threads_batch: int
    n_parallel: int = 1  # above 1, each model is a BatchedModel with this many slots
    batch_invariant: bool = False  # weights never repacked, so greedy text does not depend on the batch
    flash_attn: bool = False  # llama.cpp's flash attention in both engines (off under batch_invariant)


class ModelRegistry:
    """Loads models alongside each other within a budget and a count; never picks a victim."""

    def __init__(self, settings: LlamaSettings, budget: Budget, max_loaded_models: int, drain_timeout_s: float,
                 open_model: Callable = open_llama, clock: Callable[[], float] = time.time,
                 on_step: Callable[[str, StepInfo], None] | None = None):
        self.settings = settings
        self.budget = budget
        self.max_loaded_models = max_loaded_models
        self.drain_timeout_s = drain_timeout_s
        self._open_model = open_model
        self._clock = clock
        self._on_step = on_step  # called on a batched model's decode thread after each step (metrics)
        self._cond = threading.Condition()
        self._lifecycle = threading.Lock()
        self._models: dict[str, LoadedModel] = {}
        self._estimates: dict[tuple, MemoryEstimate] = {}

    # --- reading -------------------------------------------------------------------------

    def loaded_names(self) -> list[str]:
        with self._cond:
            return list(self._models)

    def snapshot(self) -> list[dict]:
        """Every resident model as JSON, in load order."""
        with self._cond:
            return [m.to_json() for m in self._models.values()]

    def used_bytes(self) -> int:
        with self._cond:
            return sum(m.charged_bytes for m in self._models.values())

    def memory(self) -> dict:
        return {"budget_bytes": self.budget.bytes, "used_bytes": self.used_bytes(),
                "max_loaded_models": self.max_loaded_models}

    def queue_depth(self) -> int:
        """Generations running or waiting, over all models."""
        with self._cond:
            return sum(m.active + m.waiting for m in self._models.values())

    # --- loading -------------------------------------------------------------------------

    def load(self, name: str, path: Path, settings: ModelSettings = ModelSettings()) -> LoadResult:
        """Load `name` opened with `settings` alongside the resident models; 507 insufficient_memory
        if it does not fit."""
        identity = _file_identity(path)
        n_ctx = settings.n_ctx or self.settings.n_ctx
        n_parallel = self._parallel(settings)
        estimate = self._estimate(name, path, identity, n_ctx, settings.logprobs, n_parallel)
        while True:
            with self._cond:
                current = self._models.get(name)
                if (current is not None and current.identity == identity and current.settings == settings
                        and not current.unloading):
                    current.last_used = self._clock()
                    return LoadResult(name, 0.0, True, current.measured_bytes, current.estimate.total)
            if current is not None:
                # The file was replaced under the same name, its settings changed (or an unload is
                # draining it): the old copy goes first, its generations finishing as for any unload.
                self.unload(name)
                continue
            with self._lifecycle:
                with self._cond:
                    if name in self._models:
                        continue  # another request loaded it meanwhile: look again
                    self._check_room(name, estimate.total)
                return self._open(name, path, identity, estimate, settings, n_ctx)

    def _parallel(self, settings: ModelSettings) -> int:
        """Slots for a model: N_PARALLEL, except 1 for a model loaded with logprobs (see below)."""
        # The batched sampler does not compute logprobs: such a model keeps the single-stream
        # engine, which serves its generations one at a time, with every feature.
        return 1 if settings.logprobs else self.settings.n_parallel

    def _estimate(self, name: str, path: Path, identity, n_ctx: int, logits_all: bool,
                  n_parallel: int = 1) -> MemoryEstimate:
        """The file's memory estimate for this context, remembered per file version (Gemma's header
        takes ~60 ms)."""
        key = (str(path), identity, n_ctx, logits_all, n_parallel)
        with self._cond:
            known = self._estimates.get(key)
        if known is not None:
            return known
        try:
            estimate = estimate_model_memory(read_header(path), n_ctx, logits_all, n_parallel)
        except (GgufError, OSError) as err:
            raise ApiError(422, "load_failed", f"{name} is not a loadable GGUF file: {err}") from err
        with self._cond:
            if len(self._estimates) >= MAX_REMEMBERED_ESTIMATES:
                self._estimates.clear()
            self._estimates[key] = estimate
        return estimate

    def _check_room(self, name: str, need: int) -> None:
        """507 if the count or the budget has no room for `need` more bytes; caller holds _cond."""
        resident = list(self._models.values())
        free = self.budget.bytes - sum(m.charged_bytes for m in resident)
        if len(resident) < self.max_loaded_models and need <= free:
            return
        why = (f"{len(resident)} of {self.max_loaded_models} models are loaded"
               if len(resident) >= self.max_loaded_models else
               f"{name} needs about {need} bytes and {max(free, 0)} of the {self.budget.bytes}-byte budget are free")
        raise ApiError(507, "insufficient_memory", f"cannot load {name}: {why}; unload a model first", details={
            "need_bytes": need, "free_bytes": max(free, 0), "budget_bytes": self.budget.bytes,
            "max_loaded_models": self.max_loaded_models,
            "resident": [{"name": m.name, "memory_bytes": m.charged_bytes, "active": m.active,
                          "waiting": m.waiting} for m in resident]})

    def _open(self, name: str, path: Path, identity, estimate: MemoryEstimate, settings: ModelSettings,
              n_ctx: int) -> LoadResult:
        """Construct the Llama, choose its chat template and publish its record; caller holds _lifecycle."""
        s = self.settings
        n_gpu_layers = s.n_gpu_layers if settings.n_gpu_layers is None else settings.n_gpu_layers
        gc.collect()  # garbage freed during the load would hide part of what the load takes
        return_freed_memory()
        before = process_rss_bytes()
        started = time.perf_counter()
        n_parallel = self._parallel(settings)
        try:
            if n_parallel > 1:
                llm = self._open_batched(name, path, n_ctx, n_parallel, n_gpu_layers)
            else:
                llm = self._open_model(path, n_ctx, n_gpu_layers, s.n_threads, s.n_threads_batch,
                                       logits_all=settings.logprobs, repack_weights=not s.batch_invariant,
                                       flash_attn=s.flash_attn and not s.batch_invariant)
        except Exception as err:
            return_freed_memory()
            log.warning("[registry] load of %s failed: %s", name, err)
            raise ApiError(422, "load_failed", f"llama.cpp could not load {name}: {err}") from err
        vocab_llm = llm.host if isinstance(llm, BatchedModel) else llm  # tokenizer, metadata, template
        try:
            chat = choose_chat_template(vocab_llm, settings.chat_template)
        except Exception as err:  # a template that cannot apply fails the load: the model is no use without it
            llm.close()
            return_freed_memory()
            log.warning("[registry] load of %s failed: %s", name, err)
            raise ApiError(422, "load_failed", f"{name} cannot use its chat template: {err}") from err
        load_ms = (time.perf_counter() - started) * 1000
        now = self._clock()
        record = LoadedModel(name, identity, llm, estimate, max(0, process_rss_bytes() - before),
                             llama_model_bytes(vocab_llm), now, now, settings, n_ctx, chat)
        with self._cond:
            self._models[name] = record
        log.info("[registry] loaded %s in %.1fms: estimated=%d measured=%d (llama.cpp model=%s) resident=%d "
                 "n_ctx=%d n_parallel=%d chat_template=%s settings=%s", name, load_ms, estimate.total,
                 record.measured_bytes, record.llama_model_bytes, len(self._models), n_ctx, n_parallel, chat.label,
                 settings.to_json())
        return LoadResult(name, load_ms, False, record.measured_bytes, estimate.total)

    def _open_batched(self, name: str, path: Path, n_ctx: int, n_parallel: int, n_gpu_layers: int) -> BatchedModel:
        s = self.settings
        on_step = None if self._on_step is None else (lambda info, report=self._on_step: report(name, info))
        # Flash attention as the single-stream engine opens its context (FLASH_ATTN, off by default):
        # with it in one engine only, a stream's text differs from N_PARALLEL=1's (SmolLM2 here).
        return BatchedModel(path, n_ctx_per_slot=n_ctx, n_parallel=n_parallel, n_threads=s.n_threads,
                            n_threads_batch=s.n_threads_batch, n_gpu_layers=n_gpu_layers, flash_attn=s.flash_attn,
                            batch_invariant=s.batch_invariant, on_step=on_step, name=name)

    # --- unloading -----------------------------------------------------------------------

    def unload(self, name: str) -> bool:
        """Refuse new generations for `name`, wait for its running and waiting ones, then close it.

        False if it is not loaded; 409 model_busy (and nothing unloaded) after the drain timeout.
        """
        with self._cond:
            record = self._models.get(name)
            if record is None:
                return False
            record.unload_requests += 1
            deadline = time.monotonic() + self.drain_timeout_s
            try:
                while record.busy and self._models.get(name) is record:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ApiError(409, "model_busy",
                                       f"{name} still has {record.active} running and {record.waiting} waiting "
                                       f"generation(s) after {self.drain_timeout_s:g}s; nothing was unloaded")
                    self._cond.wait(remaining)
            except BaseException:
                record.unload_requests -= 1
                self._cond.notify_all()
                raise
        with self._lifecycle:
            with self._cond:
                if self._models.get(name) is not record:
                    return False  # a concurrent unload of the same model closed it
                del self._models[name]
            self._close(record)
        return True

    def unload_all(self) -> list[str]:
        """Unload every model (each drained); 409 model_busy names the ones still busy."""
        unloaded, busy = [], []
        for name in self.loaded_names():
            try:
                if self.unload(name):
                    unloaded.append(name)
            except ApiError as err:
                if err.code != "model_busy":
                    raise
                busy.append(name)
        if busy:
            raise ApiError(409, "model_busy", f"still busy after {self.drain_timeout_s:g}s: {', '.join(busy)}; "
                           f"unloaded: {', '.join(unloaded) or 'none'}", details={"unloaded": unloaded})
        return unloaded

    def _close(self, record: LoadedModel) -> None:
        started = time.perf_counter()
        try:
            if record.batched is not None:
                # Its generations were released; a closed stream's slot is freed at the loop's next step.
                record.batched.close(self.drain_timeout_s)
            else:
                record.llm.close()
        finally:
            return_freed_memory()
        log.info("[registry] unloaded %s in %.1fms (resident=%d)", record.name,
                 (time.perf_counter() - started) * 1000, len(self._models))

    # --- generating ----------------------------------------------------------------------

    def begin(self, model: str | None) -> Generation:
        """Wait for this request's turn on `model` (in arrival order) and hand out its Llama; on a
        batched model, hand out a generation that will queue for a slot."""
        with self._cond:
            record = self._resolve(model)
            if record.unloading:
                raise ApiError(409, "model_unloading", f"{record.name} is being unloaded")
            if record.batched is not None:
                record.active += 1
                return BatchedGeneration(record.batched, record.name, record.n_ctx,
                                         lambda: self._end_batched(record), record.chat)
            record.waiting += 1
        record.turn.acquire()
        with self._cond:
            record.waiting -= 1
            record.active += 1
        return Generation(record.llm, record.name, record.n_ctx, lambda: self._end(record), record.chat,
                          record.settings.logprobs)

    def _resolve(self, model: str | None) -> LoadedModel:
        """The record a request means; caller holds _cond."""
        if model is None:
            if len(self._models) == 1:
                return next(iter(self._models.values()))
            if not self._models:
                raise ApiError(409, "model_not_loaded", "no model is loaded")
            raise ApiError(400, "model_required",
                           f"several models are loaded ({', '.join(self._models)}): say which in \"model\"")
        record = self._models.get(model)
        if record is None:
            raise ApiError(409, "model_not_loaded",
                           f"{model} is not loaded (loaded: {', '.join(self._models) or 'none'})")
        return record

    def _end_batched(self, record: LoadedModel) -> None:
        """A batched generation is over or abandoned; a draining unload may proceed."""
        with self._cond:
            record.active -= 1
            record.last_used = self._clock()
            self._cond.notify_all()

    def _end(self, record: LoadedModel) -> None:
        """A generation is over: its turn passes on, and a draining unload may proceed."""
        record.turn.release()
        with self._cond:
            record.active -= 1
            record.last_used = self._clock()
            self._cond.notify_all()
