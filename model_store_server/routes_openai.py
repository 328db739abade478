"""An OpenAI-compatible face on the store: /v1/models, /v1/completions, /v1/chat/completions.

The same swap path as /user_request (the cache headers are set here too); the worker streams
ndjson events, which become server-sent events (`data: {json}` ... `data: [DONE]`) or one JSON
body. Sampling parameters llama.cpp has (seed, top_p, stop, penalties, max_completion_tokens),
logprobs and response_format are applied, `keep_alive` goes to the store's core; tool calls,
n > 1, logit_bias and anything unknown are refused (openai_format.NEUTRAL), never ignored.
A streaming request that waits for a swap gets SSE comment lines (`: transferring X... 45%`) meanwhile.
A chat may name a session (`X-Session-Id` or `session_id`) and a `preset` (session_chat.py).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Iterator

from flask import Blueprint, Response, jsonify

from model_store_server import openai_format as fmt
from model_store_server import state
from model_store_server.forwarding import Forward, PendingForward, begin_request, keep_alive_of, start_generation
from model_store_server.model_names import model_names
from model_store_server.session_chat import ChatContext, open_chat, resolve_model
from model_store_server.worker_events import collect, events, usage, worker_headers
from model_swap.errors import ApiError
from model_swap.web import GenerationRequest, json_body, parse_generation

bp = Blueprint("openai", __name__, url_prefix="/v1")
# What a client is told when the worker's answer stops before its end (the worker died, or its connection).
BROKE_OFF = ApiError(502, "worker_error", "the worker's stream broke off before the answer was complete")
WAIT_BEFORE_PROGRESS_S = 1.0  # a request that waits longer starts its stream with progress comments
PROGRESS_EVERY_S = 0.5


def _choice(chat: bool, text: str | None, finish_reason: str | None, stream: bool, logprobs: dict | None) -> dict:
    choice: dict = {"index": 0, "finish_reason": finish_reason, "logprobs": logprobs}
    if not chat:
        choice["text"] = text or ""
    elif stream:
        choice["delta"] = {"content": text} if text is not None else {}
    else:
        choice["message"] = {"role": "assistant", "content": text or ""}
    return choice


def _parse(body: dict, chat: bool, context: ChatContext) -> tuple[str, GenerationRequest]:
    """Resolve the model, fill in the preset's and its sampling defaults, and validate the request in the store's
    spelling (with the session's history, for a session)."""
    if not chat and not isinstance(body.get("prompt"), str):
        raise ApiError(400, "invalid_request", "prompt must be one string", param="prompt")
    names = model_names()
    model = resolve_model(context.requested_model(body))
    body = names.config.apply_sampling_defaults(model, context.sampling_defaults(body))
    request = parse_generation(fmt.internal_body(body, chat), chat=chat)
    if chat:
        request = context.compose(request)
    if request.logprobs is not None and not names.config.settings_for(model).logprobs:
        raise ApiError(400, "unsupported_parameter", f"{model} does not keep logprobs; set logprobs = true for it "
                                                     "in the models config (MODELS_CONFIG)", param="logprobs")
    return model, request


def _generate(chat: bool):
    body = json_body()
    fmt.refuse_unsupported(body)
    context = open_chat(body, chat)
    try:
        return _generate_in(body, chat, context)
    except BaseException:
        context.close()
        raise


def _generate_in(body: dict, chat: bool, context: ChatContext):
    model, request = _parse(body, chat, context)
    prepare = context.fit if context.fits_tokens else None
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "invalid_request", "stream must be true or false", param="stream")
    with_usage = fmt.include_usage(body)
    keep_alive_s = keep_alive_of(body)
    store = state.core()
    outcome = begin_request(model)
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    base = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model}

    def logprobs(pieces: list[dict] | None, offset: int = 0) -> dict | None:
        return fmt.chat_logprobs(pieces) if chat else fmt.completion_logprobs(pieces, offset)

    if not stream:
        forward = start_generation(store, model, request, "ndjson", keep_alive_s, outcome, prepare)
        done = collect(forward)
        if not done.summary:  # the worker's stream broke off (logged by forwarding); nothing is recorded
            raise BROKE_OFF
        context.record(model, done.text, done.summary)
        context.close()
        answer = dict(base, choices=[_choice(chat, done.text, done.summary.get("finish_reason"), False,
                                             logprobs(done.logprobs))])
        if (counts := usage(done.summary)) is not None:
            answer["usage"] = counts
        response = forward.attach(jsonify(answer))
        response.headers.update(worker_headers(forward))
        return response

    chunk_base = dict(base, object="chat.completion.chunk" if chat else "text_completion")
    if with_usage:
        chunk_base["usage"] = None  # OpenAI's shape: null on every chunk but the last

    def frame(choices: list[dict], **extra) -> str:
        return f"data: {json.dumps(dict(chunk_base, choices=choices, **extra))}\n\n"

    def sse(forward: Forward) -> Iterator[str]:
        if chat:
            yield frame([dict(_choice(True, None, None, True, None), delta={"role": "assistant"})])
        offset, finished = 0, False
        for event in context.observe(model, events(forward)):
            if "text" in event:
                yield frame([_choice(chat, event["text"], None, True, logprobs(event.get("logprobs"), offset))])
                offset += len(event["text"])
            else:
                finished = True
                yield frame([_choice(chat, None if chat else "", event.get("finish_reason"), True, None)])
                if with_usage:
                    yield frame([], usage=usage(event))
        if not finished:  # the worker's stream broke off: say so, as an OpenAI stream carries errors
            yield f"data: {json.dumps(BROKE_OFF.to_json())}\n\n"
            return
        yield "data: [DONE]\n\n"

    pending = PendingForward(store, model, request, "ndjson", keep_alive_s, outcome, prepare)
    if pending.wait(WAIT_BEFORE_PROGRESS_S):
        forward = pending.result()  # an error here is answered with its status, as without streaming
        response = forward.attach(Response(sse(forward), mimetype="text/event-stream"))
        response.call_on_close(context.close)
        response.headers.update(worker_headers(forward))
        return response
    pending.take_over_line()

    def waiting_sse() -> Iterator[str]:
        # The status line is sent already: progress and the outcome travel as SSE comments, errors as data.
        try:
            while not pending.wait(PROGRESS_EVERY_S):
                yield f": {store.progress_text(model)}\n\n"
            try:
                forward = pending.result()
            except ApiError as err:
                yield f"data: {json.dumps(err.to_json())}\n\n"
                return
            yield forward.outcome.sse_comment()
            try:
                yield from sse(forward)
            finally:
                forward.close()
        finally:
            pending.abandon()

    response = Response(waiting_sse(), mimetype="text/event-stream", headers={"X-Accel-Buffering": "no"})
    response.call_on_close(context.close)
    return response


@bp.post("/completions")
def completions():
    """OpenAI completions: {"model", "prompt", "stream", "logprobs", "keep_alive", ...} and the sampling fields."""
    return _generate(chat=False)


@bp.post("/chat/completions")
def chat_completions():
    """OpenAI chat completions: {"model", "messages", "stream", "logprobs", "keep_alive", ...} and the sampling
    fields."""
    return _generate(chat=True)


def _model_object(model_id: str, file: str, aliases: tuple[str, ...], is_file: bool) -> dict:
    created = int((model_names().catalog.root / file).stat().st_mtime)
    obj = {"id": model_id, "object": "model", "created": created, "owned_by": "model-swap"}
    return dict(obj, aliases=list(aliases)) if is_file else dict(obj, root=file)


@bp.get("/models")
def list_models():
    """The store's models, then each alias as a model of its own (its "root" is the file), in OpenAI's list shape."""
    names = model_names()
    files = [(f, names.aliases(f)) for f in names.files()]
    return jsonify({"object": "list", "data": [_model_object(f, f, a, True) for f, a in files]
                    + [_model_object(alias, f, a, False) for f, a in files for alias in a]})


@bp.get("/models/<path:model_id>")
def get_model(model_id: str):
    """One model by any name it answers to; 404 model_not_found (with the closest names) otherwise."""
    names = model_names()
    file = names.resolve(model_id)
    if not names.catalog.has(file):
        raise ApiError(404, "model_not_found", f"{model_id} names {file}, which is not in the store", param="model")
    return jsonify(_model_object(model_id, file, names.aliases(file), is_file=model_id == file))
