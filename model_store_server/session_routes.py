"""The chat sessions' own endpoints: GET and DELETE /sessions/<id>."""

from __future__ import annotations

from flask import Blueprint, jsonify

from model_store_server import state

bp = Blueprint("sessions", __name__, url_prefix="/sessions")


@bp.get("/<session_id>")
def get_session(session_id: str):
    """The session: its preset, its own system prompt and its messages (each answer with its model and token counts)."""
    return jsonify(state.sessions().find(session_id).to_json())


@bp.delete("/<session_id>")
def delete_session(session_id: str):
    """Forget a session; 404 session_not_found if there is none. Waits for a request running on it to end."""
    state.sessions().delete(session_id)
    return jsonify({"deleted": session_id})
