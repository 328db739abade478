"""Ollama's API on the store (/api/*), so the `ollama` client and tools set up for an Ollama server work.

Generation takes the same swap path as every other route (the X-Cache-* headers are set here
too). Errors use Ollama's shape, `{"error": "message"}`, which its clients show as text, with our
stable `code` beside it; an error in the middle of a stream is an `{"error"}` line, as Ollama's.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from datetime import datetime, timezone
from typing import Iterator

from flask import Blueprint, Response, g, jsonify

from model_store_server import ollama_format as fmt
from model_store_server import state
from model_store_server.forwarding import Forward, begin_request, keep_alive_of, load_model, start_generation
from model_store_server.gguf_info import read_metadata
from model_store_server.model_names import model_names
from model_store_server.session_chat import ChatContext, open_chat, resolve_model
from model_store_server.worker_events import collect, events, worker_headers
from model_swap.errors import ApiError
from model_swap.web import json_body, parse_generation

bp = Blueprint("ollama", __name__, url_prefix="/api")
log = logging.getLogger(__name__)
# The Ollama API level whose endpoints and fields this emulates (structured outputs, /api/ps).
OLLAMA_API_VERSION = "0.6.0"


@bp.errorhandler(ApiError)
def _ollama_error(err: ApiError):
    response = jsonify({**err.details, "error": err.message, "code": err.code})
    response.status_code = err.status
    response.headers.update(err.headers)
    return response


def _wall_clock(monotonic: float | None) -> str | None:
    """An instant on the core's clock (time.monotonic) as Ollama's RFC 3339 time."""
    if monotonic is None or monotonic == float("inf"):
        return None
    moment = datetime.fromtimestamp(time.time() + monotonic - time.monotonic(), timezone.utc)
    return moment.isoformat().replace("+00:00", "Z")


def _details(metadata: dict) -> dict:
    family = str(metadata.get("general.architecture", ""))
    return {"parent_model": "", "format": "gguf", "family": family, "families": [family] if family else [],
            "parameter_size": str(metadata.get("general.size_label", "")), "quantization_level": ""}


def _metadata(file: str) -> dict:
    try:
        return read_metadata(model_names().catalog.root / file)
    except (OSError, ValueError) as err:
        log.warning("[ollama] could not read the metadata of %s: %s", file, err)
        return {}


def _model_entry(file: str, with_digest: bool = True) -> dict:
    """A model as Ollama lists it, under the first name a user would type (its config name, else the file)."""
    names = model_names()
    stored = names.catalog.get(file)
    name = (names.aliases(file) or (file,))[0]
    entry = {"name": name, "model": name, "size": stored.size, "aliases": list(names.aliases(file)), "file": file,
             "modified_at": datetime.fromtimestamp(stored.path.stat().st_mtime, timezone.utc).isoformat(),
             "details": _details(_metadata(file))}
    if with_digest:
        entry["digest"] = stored.sha256
    return entry


@bp.get("/version")
def version():
    """The Ollama API level served."""
    return jsonify({"version": OLLAMA_API_VERSION})


@bp.get("/tags")
def tags():
    """Every model in the store, once each."""
    return jsonify({"models": [_model_entry(f) for f in model_names().files()]})


def _in_store(name: str) -> bool:
    """Whether a name the worker reports is one of the store's files (a bad name is not)."""
    try:
        return model_names().catalog.has(name)
    except ApiError:
        return False


@bp.get("/ps")
def ps():
    """The models loaded on the worker (Ollama's meaning of running); under "on_disk", the rest of its disk cache."""
    core = state.core()
    # The worker's own listing: a model loaded there by other means is resident too.
    resident = [m for m in core.worker_loaded() if _in_store(m.name)]

    def entry(file: str, where: str, n_ctx: int | None = None) -> dict:
        settings = model_names().config.settings_for(file)
        base = _model_entry(file)
        # A loaded model's context is the one the worker opened it with; else the configured n_ctx,
        # else the length the model was trained for.
        context = n_ctx or settings.n_ctx or _metadata(file).get(f"{base['details']['family']}.context_length")
        # Ollama's expires_at: when the model leaves by itself (its keep-alive; for a file on disk, a ttl).
        return dict(base, size_vram=0, expires_at=_wall_clock(core.expires_at(file)), state=where,
                    context_length=context)

    # Once per model, as Ollama lists it, however many workers hold a copy ("replicas" says how many).
    copies = Counter(m.name for m in resident)
    first = {m.name: m for m in reversed(resident)}  # the first worker's copy (dicts keep the last write)
    cached = dict.fromkeys(f for worker in core.view() for f in worker["cached"] if _in_store(f))
    return jsonify({"models": [dict(entry(name, "loaded", first[name].n_ctx), replicas=copies[name])
                               for name in copies],
                    "on_disk": [entry(f, "on_disk") for f in cached if f not in copies]})


@bp.post("/show")
def show():
    """What Ollama's show says of a model: details, metadata, template, parameters."""
    body = json_body()
    names = model_names()
    file = names.resolve(body.get("model") or body.get("name"))
    entry = names.config.for_file(file)
    metadata = _metadata(file)
    settings = names.config.settings_for(file)
    template = settings.chat_template or metadata.get("tokenizer.chat_template") or "plain (fallback)"
    parameters = "\n".join(f"{k} {json.dumps(v)}" for k, v in (entry.sampling.items() if entry else ()))
    return jsonify({"modelfile": f"FROM {file}\n" + "".join(f"PARAMETER {line}\n" for line in parameters.splitlines()),
                    "parameters": parameters, "template": template, "details": _details(metadata),
                    "model_info": {k: v for k, v in metadata.items() if k != "tokenizer.chat_template"},
                    "capabilities": ["completion"], "modified_at": _model_entry(file, with_digest=False)["modified_at"]})


def _ndjson(objects: Iterator[dict]) -> Iterator[str]:
    for obj in objects:
        yield json.dumps(obj) + "\n"


def _generate(chat: bool):
    started = time.perf_counter()
    body = json_body()
    context = open_chat(body, chat)
    try:
        return _generate_in(body, chat, context, started)
    except BaseException:
        context.close()
        raise


def _generate_in(body: dict, chat: bool, context: ChatContext, started: float):
    names = model_names()
    model = resolve_model(context.requested_model(body))
    stream = body.get("stream", True)  # Ollama streams unless told not to
    if not isinstance(stream, bool):
        raise ApiError(400, "invalid_request", "stream must be true or false", param="stream")
    keep_alive_s = keep_alive_of(body)  # how long the model stays once idle (the core's keep-alive)
    empty = not body.get("messages") if chat else not body.get("prompt")
    if empty:
        context.close()
        return _load_only(model, keep_alive_s)
    fields = fmt.chat_body(body) if chat else fmt.generate_body(body)
    fields = names.config.apply_sampling_defaults(model, context.sampling_defaults(fields))
    generation = parse_generation(fields, chat="messages" in fields)
    if generation.messages is not None:
        generation = context.compose(generation)
    forward = start_generation(state.core(), model, generation, "ndjson", keep_alive_s, begin_request(model),
                               context.fit if context.fits_tokens else None)
    name = body.get("model") or model

    def piece(text: str) -> dict:
        content = {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
        return {"model": name, "created_at": fmt.now_rfc3339(), **content, "done": False}

    if not stream:
        done = collect(forward)
        if done.summary:
            context.record(model, done.text, done.summary)
        context.close()
        first = done.first_text_at - started if done.first_text_at else None
        response = forward.attach(jsonify(dict(piece(done.text), **_timings(forward, done.summary, started, first))))
    else:
        def lines() -> Iterator[dict]:
            first = None
            for event in context.observe(model, events(forward)):
                if "text" in event:
                    first = first or time.perf_counter() - started
                    yield piece(event["text"])
                else:
                    yield dict(piece(""), **_timings(forward, event, started, first))
                    return
            # No summary: the worker's stream broke off (logged by forwarding); say so as Ollama would.
            yield {"error": "the worker's stream broke off before the answer was complete", "code": "worker_error"}

        response = forward.attach(Response(_ndjson(lines()), mimetype="application/x-ndjson"))
        response.call_on_close(context.close)
    response.headers.update(worker_headers(forward))
    return response


def _timings(forward: Forward, summary: dict, started: float, first_token_s: float | None) -> dict:
    """Ollama's closing fields; durations in nanoseconds, measured at the store."""
    total = time.perf_counter() - started
    load = forward.outcome.worker_ms / 1000
    first = first_token_s if first_token_s is not None else total
    return {"done": True, "done_reason": summary.get("finish_reason") or "stop", "total_duration": int(total * 1e9),
            "load_duration": int(load * 1e9), "prompt_eval_count": summary.get("prompt_tokens"),
            "prompt_eval_duration": int(max(first - load, 0) * 1e9), "eval_count": summary.get("completion_tokens"),
            "eval_duration": int(max(total - first, 0) * 1e9)}


def _load_only(model: str, keep_alive_s: float | None):
    """Ollama's empty request: load the model (the swap path), or with keep_alive 0 unload it, and say so."""
    started = time.perf_counter()
    outcome = begin_request(model)
    if keep_alive_s == 0:  # Ollama's way to unload a model now; its file stays on the worker's disk
        outcome = g.outcome = state.core().unload(model)
        reason = "unload"
    else:
        load_model(state.core(), model, keep_alive_s, outcome)
        reason = "load"
    response = jsonify({"model": model, "created_at": fmt.now_rfc3339(), "response": "", "done": True,
                        "done_reason": reason, "total_duration": int((time.perf_counter() - started) * 1e9)})
    response.headers.update(outcome.headers())
    return response


@bp.post("/generate")
def generate():
    """Ollama's generate: {"model", "prompt", "system", "raw", "format", "options", "stream", "keep_alive"}."""
    return _generate(chat=False)


@bp.post("/chat")
def chat():
    """Ollama's chat: {"model", "messages", "format", "options", "stream", "keep_alive"}."""
    return _generate(chat=True)


@bp.route("/<path:rest>", methods=["GET", "POST", "PUT", "DELETE", "HEAD"])
def unsupported(rest: str):
    """Ollama endpoints that manage a model library (pull, push, create, copy, delete) or embed."""
    raise ApiError(501, "unsupported_endpoint", f"/api/{rest} is not supported: model-swap serves the .gguf files "
                                                "in its MODELS_DIR and generates text")
