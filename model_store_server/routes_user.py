"""POST /user_request: make sure the model is loaded, then stream the worker's text back."""

from __future__ import annotations

from flask import Blueprint, Response

from model_store_server import state
from model_store_server.forwarding import begin_request, keep_alive_of, start_generation
from model_store_server.model_names import model_names
from model_store_server.session_chat import resolve_model
from model_swap.web import GENERATION_FIELDS, json_body, parse_generation, refuse_unknown

bp = Blueprint("user", __name__)
ACCEPTED = (GENERATION_FIELDS - {"messages"}) | {"model", "keep_alive"}


@bp.post("/user_request")
def user_request():
    """Stream generated text for {"prompt", "model", "max_tokens", "keep_alive", ...}; headers tell the cache action."""
    body = json_body()
    refuse_unknown(body, ACCEPTED)
    names = model_names()
    model = resolve_model(body.get("model"))  # "active": the model loaded most recently
    generation = parse_generation(names.config.apply_sampling_defaults(model, body), chat=False)
    keep_alive_s = keep_alive_of(body)
    forward = start_generation(state.core(), model, generation, keep_alive_s=keep_alive_s,
                               outcome=begin_request(model))
    return forward.attach(Response(forward.chunks(), mimetype="text/plain"))
