"""An OpenAI-compatible face on the store: /v1/models, /v1/completions, /v1/chat/completions.

The same swap path as /user_request (the cache headers are set here too); the worker streams
ndjson events, which become server-sent events (`data: {json}` ... `data: [DONE]`) or one JSON
body. Sampling parameters llama.cpp has (seed, top_p, stop, penalties, max_completion_tokens) are
applied; tool calls, n > 1, logprobs, logit_bias and anything unknown are refused, never ignored.
A streaming request that waits for a swap gets SSE comment lines (`: transferring X... 45%`) meanwhile.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Iterator

from flask import Blueprint, Response, jsonify

from model_store_server import state
from model_store_server.forwarding import Forward, PendingForward, begin_request, keep_alive_of, start_generation
from model_swap.errors import ApiError
from model_swap.web import GENERATION_FIELDS, json_body, parse_generation, refuse_unknown

bp = Blueprint("openai", __name__, url_prefix="/v1")
# Parameters model-swap cannot apply: accepted only with the value that asks for nothing.
NEUTRAL = {"n": (None, 1), "best_of": (None, 1), "logprobs": (None, False), "top_logprobs": (None, 0),
           "echo": (None, False), "suffix": (None,), "tools": (None, []),
           "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
           "response_format": (None, {"type": "text"})}
# Applied (GENERATION_FIELDS go to llama.cpp, keep_alive to the store), or metadata with no effect ("user").
ACCEPTED = GENERATION_FIELDS | {"model", "stream", "user", "keep_alive"} | set(NEUTRAL)
WAIT_BEFORE_PROGRESS_S = 1.0  # a request that waits longer starts its stream with progress comments
PROGRESS_EVERY_S = 0.5


def _events(forward: Forward) -> Iterator[dict]:
    """The worker's ndjson events as dicts."""
    buffer = b""
    for chunk in forward.chunks():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)


def _usage(summary: dict) -> dict | None:
    if summary.get("prompt_tokens") is None:
        return None
    prompt, completion = summary["prompt_tokens"], summary["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _choice(chat: bool, text: str | None, finish_reason: str | None, stream: bool) -> dict:
    choice: dict = {"index": 0, "finish_reason": finish_reason}
    if not chat:
        choice.update(text=text or "", logprobs=None)
    elif stream:
        choice["delta"] = {"content": text} if text is not None else {}
    else:
        choice["message"] = {"role": "assistant", "content": text or ""}
    return choice


def _generate(chat: bool):
    body = json_body()
    refuse_unknown(body, ACCEPTED)
    for key, neutral in NEUTRAL.items():
        if body.get(key) not in neutral:
            raise ApiError(400, "unsupported_parameter", f"{key}={body.get(key)!r} is not supported by model-swap")
    if not chat and not isinstance(body.get("prompt"), str):
        raise ApiError(400, "invalid_request", "prompt must be one string")
    generation = parse_generation(body, chat=chat)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "invalid_request", "stream must be true or false")
    keep_alive_s = keep_alive_of(body)
    store = state.core()
    model = store.catalog.check_name(body.get("model"))
    outcome = begin_request(model)
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    base = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model}

    if not stream:
        forward = start_generation(store, model, generation, "ndjson", keep_alive_s, outcome)
        try:
            texts, summary = [], {}
            for event in _events(forward):
                if "text" in event:
                    texts.append(event["text"])
                else:
                    summary = event
        finally:
            forward.close()
        body = dict(base, choices=[_choice(chat, "".join(texts), summary.get("finish_reason"), False)])
        if (usage := _usage(summary)) is not None:
            body["usage"] = usage
        return forward.attach(jsonify(body))

    chunk_base = dict(base, object="chat.completion.chunk" if chat else "text_completion")

    def sse(forward: Forward) -> Iterator[str]:
        if chat:
            first = dict(chunk_base, choices=[dict(_choice(True, None, None, True), delta={"role": "assistant"})])
            yield f"data: {json.dumps(first)}\n\n"
        for event in _events(forward):
            if "text" in event:
                yield f"data: {json.dumps(dict(chunk_base, choices=[_choice(chat, event['text'], None, True)]))}\n\n"
            else:
                last = dict(chunk_base, choices=[_choice(chat, None if chat else '', event.get('finish_reason'), True)])
                yield f"data: {json.dumps(last)}\n\n"
        yield "data: [DONE]\n\n"

    pending = PendingForward(store, model, generation, "ndjson", keep_alive_s, outcome)
    if pending.wait(WAIT_BEFORE_PROGRESS_S):
        forward = pending.result()  # an error here is answered with its status, as without streaming
        return forward.attach(Response(sse(forward), mimetype="text/event-stream"))
    pending.take_over_line()

    def waiting_sse() -> Iterator[str]:
        # The status line is sent already: progress and the outcome travel as SSE comments, errors as data.
        try:
            while not pending.wait(PROGRESS_EVERY_S):
                yield f": {store.progress_text(model)}\n\n"
            try:
                forward = pending.result()
            except ApiError as err:
                yield f"data: {json.dumps({'error': {'code': err.code, 'message': err.message}})}\n\n"
                return
            o = forward.outcome
            yield (f": x-cache-action={o.action} evicted={','.join(o.evicted)} unloaded={','.join(o.unloaded)}"
                   f" worker_ms={o.worker_ms:.1f}\n\n")
            try:
                yield from sse(forward)
            finally:
                forward.close()
        finally:
            pending.abandon()

    return Response(waiting_sse(), mimetype="text/event-stream", headers={"X-Accel-Buffering": "no"})


@bp.post("/completions")
def completions():
    """OpenAI completions: {"model", "prompt", "stream", "keep_alive"} and the sampling fields (GENERATION_FIELDS)."""
    return _generate(chat=False)


@bp.post("/chat/completions")
def chat_completions():
    """OpenAI chat completions: {"model", "messages", "stream", "keep_alive"} and the sampling fields."""
    return _generate(chat=True)


@bp.get("/models")
def list_models():
    """The store's models, in OpenAI's list shape."""
    models = state.core().catalog.list()
    return jsonify({"object": "list", "data": [
        {"id": m.name, "object": "model", "created": int(m.path.stat().st_mtime), "owned_by": "model-swap"}
        for m in models]})
