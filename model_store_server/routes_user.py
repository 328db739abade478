"""POST /user_request: make sure the model is loaded, then stream the worker's text back."""

from __future__ import annotations

from flask import Blueprint, Response, current_app

from model_store_server.forwarding import start_generation
from model_store_server.model_names import model_names
from model_swap.web import GENERATION_FIELDS, json_body, parse_generation, refuse_unknown

bp = Blueprint("user", __name__)
ACCEPTED = (GENERATION_FIELDS - {"messages"}) | {"model"}


@bp.post("/user_request")
def user_request():
    """Stream generated text for {"prompt", "model", "max_tokens", ...}; headers tell the cache action."""
    body = json_body()
    refuse_unknown(body, ACCEPTED)
    names = model_names()
    model = names.resolve(body.get("model"))
    request = parse_generation(names.config.apply_sampling_defaults(model, body), chat=False)
    forward = start_generation(current_app.extensions["store"]["swapper"], model, request)
    return forward.attach(Response(forward.chunks(), mimetype="text/plain"))
