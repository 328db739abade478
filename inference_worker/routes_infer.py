"""Streaming generation on the loaded model."""

from __future__ import annotations

import logging
import time
from typing import Iterator

from flask import Blueprint, Response

from inference_worker import state
from inference_worker.engine import Generation
from inference_worker.metrics import WorkerMetrics
from model_swap.errors import ApiError
from model_swap.names import check_model_name
from model_swap.web import generation_fields, json_body

bp = Blueprint("infer", __name__)
log = logging.getLogger(__name__)


def _parse() -> tuple[str, int, float | None, str | None]:
    body = json_body()
    prompt, max_tokens, temperature = generation_fields(body)
    model = body.get("model")
    if model is not None:
        check_model_name(model)
    return prompt, max_tokens, temperature, model


def _stream(gen: Generation, prompt: str, max_tokens: int, temperature: float | None,
            metrics: WorkerMetrics) -> Iterator[bytes]:
    """Yield encoded text, logging TTFT and throughput once the stream ends."""
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    finished = False
    try:
        for text in gen.stream(prompt, max_tokens, temperature):
            if first is None:
                first = time.perf_counter() - started
                metrics.ttft_seconds.observe(first)
                log.info("[infer] TTFT: %.3fs", first)
            tokens += 1
            yield text.encode("utf-8")
        finished = True
    finally:
        gen.release()
        total = time.perf_counter() - started
        metrics.tokens.inc(tokens)
        metrics.requests.labels("ok" if finished else "disconnected").inc()
        log.info("[infer] tokens=%d total=%.3fs tps=%.1f%s", tokens, total, tokens / total if total else 0.0,
                 "" if finished else " (client disconnected)")


@bp.post("/infer")
def infer():
    """Stream text/plain from the loaded model; 409 model_not_loaded if `model` names another."""
    prompt, max_tokens, temperature, model = _parse()
    metrics = state.metrics()
    try:
        gen = state.engine().begin(model)
    except ApiError:
        metrics.requests.labels("rejected").inc()
        raise
    try:
        gen.check_prompt(prompt)
    except BaseException:
        gen.release()
        metrics.requests.labels("rejected").inc()
        raise
    state.cache().touch(gen.name)
    response = Response(_stream(gen, prompt, max_tokens, temperature, metrics), mimetype="text/plain")
    # If the body is never iterated, the turn must still end.
    response.call_on_close(gen.release)
    response.headers["X-Model-Name"] = gen.name
    response.headers["X-Accel-Buffering"] = "no"
    return response
