"""Ollama's API on the store (/api/*), so the `ollama` client and tools set up for an Ollama server work.

Generation takes the same swap path as every other route (the X-Cache-* headers are set here
too). Errors use Ollama's shape, `{"error": "message"}`, which its clients show as text, with our
stable `code` beside it; an error in the middle of a stream is an `{"error"}` line, as Ollama's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from datetime import datetime, timezone
from typing import Iterator

from flask import Blueprint, Response, current_app, jsonify

from model_store_server import ollama_format as fmt
from model_store_server.forwarding import Forward, start_generation, take_lease
from model_store_server.gguf_info import read_metadata
from model_store_server.model_names import model_names
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
    if monotonic is None:
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
    swapper = current_app.extensions["store"]["swapper"]
    # The worker's own listing: it keeps several models resident, not only the one the store loaded last.
    resident = [e for e in swapper.worker.state().resident if _in_store(e["name"])]

    def entry(file: str, state: str, worker_entry: dict | None = None) -> dict:
        settings = model_names().config.settings_for(file)
        base = _model_entry(file)
        # A loaded model's context is the one the worker opened it with; else the configured n_ctx,
        # else the length the model was trained for.
        context = ((worker_entry or {}).get("n_ctx") or settings.n_ctx
                   or _metadata(file).get(f"{base['details']['family']}.context_length"))
        return dict(base, size_vram=0, expires_at=_wall_clock(swapper.expires_at(file)), state=state,
                    context_length=context)

    loaded = {e["name"] for e in resident}
    cached = [f for f in swapper.cached() if _in_store(f)]
    return jsonify({"models": [entry(e["name"], "loaded", e) for e in resident],
                    "on_disk": [entry(f, "on_disk") for f in cached if f not in loaded]})


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
    names = model_names()
    model = names.resolve(body.get("model"))
    stream = body.get("stream", True)  # Ollama streams unless told not to
    if not isinstance(stream, bool):
        raise ApiError(400, "invalid_request", "stream must be true or false", param="stream")
    keep_alive = fmt.keep_alive_seconds(body.get("keep_alive"))
    empty = not body.get("messages") if chat else not body.get("prompt")
    if empty:
        return _load_only(model, keep_alive)
    fields = fmt.chat_body(body) if chat else fmt.generate_body(body)
    generation = parse_generation(names.config.apply_sampling_defaults(model, fields), chat="messages" in fields)
    # Passed on for the store's core, which decides how long a model stays (keep-alive).
    generation = dataclasses.replace(generation, keep_alive_s=keep_alive)
    forward = start_generation(current_app.extensions["store"]["swapper"], model, generation, "ndjson")
    name = body.get("model")

    def piece(text: str) -> dict:
        content = {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
        return {"model": name, "created_at": fmt.now_rfc3339(), **content, "done": False}

    if not stream:
        done = collect(forward)
        first = done.first_text_at - started if done.first_text_at else None
        response = forward.attach(jsonify(dict(piece(done.text), **_timings(forward, done.summary, started, first))))
    else:
        def lines() -> Iterator[dict]:
            first = None
            for event in events(forward):
                if "text" in event:
                    first = first or time.perf_counter() - started
                    yield piece(event["text"])
                else:
                    yield dict(piece(""), **_timings(forward, event, started, first))
                    return
            # No summary: the worker's stream broke off (logged by forwarding); say so as Ollama would.
            yield {"error": "the worker's stream broke off before the answer was complete", "code": "worker_error"}

        response = forward.attach(Response(_ndjson(lines()), mimetype="application/x-ndjson"))
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


def _load_only(model: str, keep_alive: float | None):
    """Ollama's empty request: load the model (the swap path) and say so; unloading on request is refused."""
    if keep_alive == 0:
        raise ApiError(400, "unsupported_parameter", "unloading on request (keep_alive: 0) is not supported; the "
                                                     "store's cache policy decides what stays", param="keep_alive")
    started = time.perf_counter()
    lease = take_lease(current_app.extensions["store"]["swapper"], model)
    lease.release()
    response = jsonify({"model": model, "created_at": fmt.now_rfc3339(), "response": "", "done": True,
                        "done_reason": "load", "total_duration": int((time.perf_counter() - started) * 1e9)})
    response.headers.update(lease.outcome.headers())
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
