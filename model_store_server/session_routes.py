"""The chat sessions' own endpoints: GET and DELETE /sessions/<id>."""

from __future__ import annotations

from flask import Blueprint, jsonify

from model_store_server import state
from model_store_server.sessions import check_session_id
from model_swap.errors import ApiError

bp = Blueprint("sessions", __name__, url_prefix="/sessions")


@bp.get("/<session_id>")
def get_session(session_id: str):
    """The session: its preset, its own system prompt and its messages (each answer with its model and token counts)."""
    stored = state.sessions().store.get(check_session_id(session_id))
    if stored is None:
        raise ApiError(404, "session_not_found", f"no session {session_id} (or it expired)", param="session_id")
    return jsonify(stored.to_json())


@bp.delete("/<session_id>")
def delete_session(session_id: str):
    """Forget a session; 404 session_not_found if there is none. Waits for a request running on it to end."""
    sessions = state.sessions()
    check_session_id(session_id)
    sessions.locks.acquire(session_id, sessions.wait_s)
    try:
        if not sessions.store.delete(session_id):
            raise ApiError(404, "session_not_found", f"no session {session_id}", param="session_id")
    finally:
        sessions.locks.release(session_id)
    return jsonify({"deleted": session_id})
