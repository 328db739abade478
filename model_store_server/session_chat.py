"""What sessions and presets add to a chat request: the model it means, its history, and its record.

A chat request may name a session (`X-Session-Id` header or `session_id` in the body) and a
preset (`preset`). `open_chat` reads both and, for a session, holds the session's lock until
the request ends (`close`), so one session's turns never interleave. The request is sent with
the system prompt (the request's own, else the session's, else the preset's), the session's
history bounded by messages and characters (`compose`) and, once the model is leased, by
prompt tokens counted by the worker (`fit`). A generation that ends with the worker's summary
is recorded (`record`): the request's messages and the answer, with its model and token counts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

from flask import request

from model_store_server import state
from model_store_server.model_names import model_names
from model_store_server.models_config import Preset
from model_store_server.session_history import SessionBounds, TokenCounter, bound_history, fit_tokens
from model_store_server.sessions import Answer, Session, SessionLocks, SessionStore, check_session_id
from model_swap.errors import ApiError
from model_swap.once import Once
from model_swap.web import GenerationRequest

ACTIVE = "active"  # the model name that means "the model most recently loaded"


@dataclass
class Sessions:
    """The store's sessions: the database, the per-session locks and the history bounds."""

    store: SessionStore
    locks: SessionLocks
    bounds: SessionBounds
    wait_s: float  # how long a request waits for its session's previous request

    def find(self, session_id: str) -> Session:
        """The stored session; 404 session_not_found if there is none (or it expired)."""
        stored = self.store.get(check_session_id(session_id))
        if stored is None:
            raise ApiError(404, "session_not_found", f"no session {session_id} (or it expired)", param="session_id")
        return stored

    def delete(self, session_id: str) -> None:
        """Forget a session once a request running on it has ended; 404 session_not_found if there is none."""
        self.locks.acquire(check_session_id(session_id), self.wait_s)
        try:
            if not self.store.delete(session_id):
                raise ApiError(404, "session_not_found", f"no session {session_id}", param="session_id")
        finally:
            self.locks.release(session_id)


def resolve_model(requested: object) -> str:
    """The file a request's model name means; "active" is the model most recently loaded (404 no_active_model)."""
    if requested == ACTIVE:
        active = state.core().active_model()
        if active is None:
            raise ApiError(404, "no_active_model", "no model is loaded, so \"active\" names none", param="model")
        return active
    return model_names().resolve(requested)


def _session_id(body: dict) -> str | None:
    header, field = request.headers.get("X-Session-Id"), body.get("session_id")
    if header is not None and field is not None and header != field:
        raise ApiError(400, "invalid_session_id", "X-Session-Id and session_id name different sessions",
                       param="session_id")
    value = header if header is not None else field
    return None if value is None else check_session_id(value)


class ChatContext:
    """One chat request's session (if any) and preset (if any); close() when the request ends."""

    def __init__(self, sessions: Sessions, session_id: str | None, preset: Preset | None, stored: Session | None):
        self._sessions = sessions
        self.session_id = session_id
        self.preset = preset
        self._stored = stored
        self._system: list[dict] = []
        self._history: list[dict] = []
        self._new: list[dict] = []
        self._sent = 0
        self._own_system: str | None = stored.system if stored else None  # a request's system prompt, kept
        self.close = Once(lambda: sessions.locks.release(session_id) if session_id else None)

    def requested_model(self, body: dict) -> object:
        """The model the request means: its own, else the preset's, else the model of the session's last answer."""
        if body.get("model") not in (None, ""):
            return body["model"]
        if self.preset is not None and self.preset.model:
            return self.preset.model
        answers = [m for m in (self._stored.messages if self._stored else ()) if m.get("model")]
        return answers[-1]["model"] if answers else body.get("model")

    def sampling_defaults(self, body: dict) -> dict:
        """The body with the preset's sampling filled in where the request is silent."""
        return body if self.preset is None else self.preset.apply_sampling(body)

    def compose(self, generation: GenerationRequest) -> GenerationRequest:
        """The request with its system prompt and the session's history (bounded by messages and characters)."""
        own_system = [m for m in generation.messages if m["role"] == "system"]
        self._new = [m for m in generation.messages if m["role"] != "system"]
        if own_system:
            self._system = own_system
            self._own_system = "\n".join(m["content"] for m in own_system)
        elif self._own_system is not None:
            self._system = [{"role": "system", "content": self._own_system}]
        elif self.preset is not None:
            self._system = [{"role": "system", "content": self.preset.system}]
        if self.session_id is not None and self._stored is not None:
            self._history = bound_history(self._system, self._stored.turns(), self._new, self._sessions.bounds)
        return self._with([*self._system, *self._history, *self._new], generation)

    def fit(self, generation: GenerationRequest, count: TokenCounter) -> GenerationRequest:
        """The composed request trimmed to the prompt-token budget, counted with the leased model."""
        if not self._history:
            return generation
        return self._with(fit_tokens(self._system, self._history, self._new, self._sessions.bounds,
                                     generation.max_tokens, count), generation)

    @property
    def fits_tokens(self) -> bool:
        """Whether fit() has history to trim (then it needs the leased model's token counts)."""
        return bool(self._history)

    def _with(self, messages: list[dict], generation: GenerationRequest) -> GenerationRequest:
        self._sent = len(messages)
        return replace(generation, messages=tuple(messages))

    def record(self, model: str, text: str, summary: dict) -> None:
        """Append the request's messages and the answer to the session (only for a generation that ended)."""
        if self.session_id is None:
            return
        self._sessions.store.record(self.session_id, self.preset.name if self.preset else None, self._own_system,
                                    self._new, text, Answer(model, summary.get("prompt_tokens"),
                                                            summary.get("completion_tokens"), self._sent),
                                    keep_last=self._sessions.bounds.max_messages)

    def observe(self, model: str, events: Iterator[dict]) -> Iterator[dict]:
        """Pass the worker's events on, collecting the text; record the answer when the summary arrives."""
        texts: list[str] = []
        for event in events:
            if "text" in event:
                texts.append(event["text"])
            else:
                self.record(model, "".join(texts), event)
            yield event


def open_chat(body: dict, chat: bool) -> ChatContext:
    """The request's session and preset; for a session, wait for its previous request to end."""
    sessions: Sessions = state.sessions()
    session_id = _session_id(body)
    preset_name = body.get("preset")
    if not chat and (session_id is not None or preset_name is not None):
        raise ApiError(400, "invalid_request", "sessions and presets apply to chats (/v1/chat/completions, /api/chat)",
                       param="session_id" if session_id is not None else "preset")
    config = model_names().config
    preset = config.preset(preset_name) if preset_name is not None else None
    if session_id is None:
        return ChatContext(sessions, None, preset, None)
    sessions.locks.acquire(session_id, sessions.wait_s)
    try:
        stored = sessions.store.get(session_id)
        if preset is None and stored is not None and stored.preset is not None:
            # The session keeps its preset; one removed from the config since is not an error for the session.
            preset = config.presets.get(stored.preset)
    except BaseException:
        sessions.locks.release(session_id)
        raise
    return ChatContext(sessions, session_id, preset, stored)
