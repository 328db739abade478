"""Streaming generation on a resident model."""

from __future__ import annotations

import itertools
import json
import logging
import time
from typing import Iterator

from flask import Blueprint, Response

from inference_worker import state
from inference_worker.engine import Generation, Piece
from inference_worker.metrics import WorkerMetrics
from model_swap.errors import ApiError
from model_swap.names import check_model_name
from model_swap.web import GenerationRequest, json_body, parse_generation

bp = Blueprint("infer", __name__)
log = logging.getLogger(__name__)
STREAM_FORMATS = ("text", "ndjson")


def _start(gen: Generation, request: GenerationRequest) -> Iterator[Piece]:
    """Begin generating and pull the first piece now, so a failure is still an error response."""
    if request.prompt is not None:
        gen.check_prompt(request.prompt)
    else:
        gen.check_messages(request.messages)
    pieces = gen.stream(request)
    try:
        first = next(pieces, None)
    except ValueError as err:  # llama.cpp's word for a chat that does not fit the context
        raise ApiError(400, "prompt_too_long", str(err)) from None
    return itertools.chain([] if first is None else [first], pieces)


def _stream(gen: Generation, pieces: Iterator[Piece], started: float, ndjson: bool,
            metrics: WorkerMetrics) -> Iterator[bytes]:
    """Yield text (or ndjson events ending with a summary), logging TTFT and throughput at the end."""
    first: float | None = None
    tokens = 0
    finished = False
    try:
        for piece in pieces:
            if first is None:
                first = time.perf_counter() - started
                metrics.ttft_seconds.observe(first)
                log.info("[infer] TTFT: %.3fs", first)
            tokens += 1
            event = {"text": piece, **({"logprobs": piece.logprobs} if piece.logprobs else {})}
            yield (json.dumps(event) + "\n").encode() if ndjson else piece.encode("utf-8")
        finished = True
        if ndjson:
            yield (json.dumps({"finish_reason": gen.finish_reason, "completion_tokens": tokens,
                               "prompt_tokens": gen.prompt_tokens}) + "\n").encode()
    finally:
        gen.release()
        total = time.perf_counter() - started
        metrics.tokens.inc(tokens)
        metrics.requests.labels("ok" if finished else "disconnected").inc()
        log.info("[infer] tokens=%d total=%.3fs tps=%.1f%s", tokens, total, tokens / total if total else 0.0,
                 "" if finished else " (client disconnected)")


@bp.post("/infer")
def infer():
    """Stream from a resident model: 409 model_not_loaded if it is not loaded, 409 model_unloading
    while an unload drains it; `model` may be left out only while exactly one model is loaded.

    Body: {"prompt" or "messages", "max_tokens", "temperature", "logprobs", "response_format", "model",
    "stream_format"}. stream_format "text" (default) is text/plain; "ndjson" is one {"text"} object
    per piece (with "logprobs" when asked for) and a last {"finish_reason", "completion_tokens",
    "prompt_tokens"}.
    """
    body = json_body()
    request = parse_generation(body)
    model = body.get("model")
    if model is not None:
        check_model_name(model)
    stream_format = body.get("stream_format", "text")
    if stream_format not in STREAM_FORMATS:
        raise ApiError(400, "invalid_request", f"stream_format must be one of {', '.join(STREAM_FORMATS)}")
    metrics = state.metrics()
    try:
        gen = state.registry().begin(model)
    except ApiError:
        metrics.requests.labels("rejected").inc()
        raise
    started = time.perf_counter()
    try:
        pieces = _start(gen, request)
    except BaseException:
        gen.release()
        metrics.requests.labels("rejected").inc()
        raise
    state.cache().touch(gen.name)
    ndjson = stream_format == "ndjson"
    response = Response(_stream(gen, pieces, started, ndjson, metrics),
                        mimetype="application/x-ndjson" if ndjson else "text/plain")
    # If the body is never iterated, the turn must still end.
    response.call_on_close(gen.release)
    response.headers["X-Model-Name"] = gen.name
    if request.messages is not None:
        response.headers["X-Chat-Template"] = gen.chat.label
    response.headers["X-Accel-Buffering"] = "no"
    return response


@bp.post("/tokenize")
def tokenize():
    """Count a prompt's tokens as /infer would feed them: {"model", "prompt" or "messages"} -> {"model", "tokens",
    "n_ctx"}. A chat is rendered with the model's chat template; the model must be loaded (409 model_not_loaded)."""
    body = json_body()
    request = parse_generation({k: body.get(k) for k in ("prompt", "messages")})
    model = body.get("model")
    if model is not None:
        check_model_name(model)
    # The model's turn: its Llama is not safe to share, and an unload must wait for the count.
    gen = state.registry().begin(model)
    try:
        tokens = gen.count_tokens(request.prompt, request.messages)
    finally:
        gen.release()
    return {"model": gen.name, "tokens": tokens, "n_ctx": gen.n_ctx}
