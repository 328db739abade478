"""Chat sessions in SQLite (SESSIONS_DB): each session's preset, system prompt and messages.

One connection, shared by the request threads behind a lock (each statement is short); WAL, so
a reader never waits for a writer's fsync and a crash loses at most the last commit. Idle
sessions (SESSION_TTL_S) are deleted at the next session access. `SessionLocks` serializes the
requests of one session for the whole generation, so two turns never interleave.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from model_swap.errors import ApiError

log = logging.getLogger(__name__)
SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, preset TEXT, system TEXT, created REAL NOT NULL, updated REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_updated ON sessions (updated);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL,
    model TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, context_messages INTEGER, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS messages_session ON messages (session_id, seq);
"""


def check_session_id(value: object) -> str:
    """A session id: 1-128 letters, digits, '.', '_', ':' or '-', starting with a letter or digit."""
    if not isinstance(value, str) or not SESSION_ID.fullmatch(value):
        raise ApiError(400, "invalid_session_id", "a session id is 1 to 128 letters, digits, '.', '_', ':' or '-', "
                                                  "starting with a letter or digit", param="session_id")
    return value


@dataclass(frozen=True)
class Answer:
    """What an assistant message records besides its text: who wrote it and what it cost."""

    model: str
    prompt_tokens: int | None
    completion_tokens: int | None
    context_messages: int  # messages sent to the model for it, the system prompt included


@dataclass(frozen=True)
class Session:
    """A stored session: its preset, its own system prompt (if a request gave one) and its messages in order."""

    id: str
    preset: str | None
    system: str | None
    created: float
    updated: float
    messages: tuple[dict, ...]

    def turns(self) -> list[dict]:
        """The messages as a chat sends them: role and content only."""
        return [{"role": m["role"], "content": m["content"]} for m in self.messages]

    def to_json(self) -> dict:
        return {"id": self.id, "preset": self.preset, "system": self.system, "created_at": self.created,
                "updated_at": self.updated, "messages": list(self.messages)}


class SessionStore:
    """The sessions database; thread-safe."""

    def __init__(self, path: Path | None, ttl_s: float, clock: Callable[[], float] = time.time):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._ttl_s = ttl_s
        self._clock = clock
        self._next_expiry = 0.0
        self._lock = threading.Lock()
        # isolation_level=None: we open transactions ourselves (BEGIN IMMEDIATE), one per change.
        self._db = sqlite3.connect(":memory:" if path is None else str(path), check_same_thread=False,
                                   isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            if path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        self.expire()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def expire(self) -> int:
        """Delete the sessions idle for longer than the ttl; how many went. At most every tenth of the ttl
        (and every minute): it is a write, and most accesses find nothing to expire."""
        now = self._clock()
        if now < self._next_expiry:
            return 0
        self._next_expiry = now + min(self._ttl_s / 10, 60.0)
        cutoff = now - self._ttl_s
        with self._transaction() as db:
            db.execute("DELETE FROM messages WHERE session_id IN (SELECT id FROM sessions WHERE updated < ?)",
                       (cutoff,))
            gone = db.execute("DELETE FROM sessions WHERE updated < ?", (cutoff,)).rowcount
        if gone:
            log.info("[sessions] expired %d idle session(s)", gone)
        return gone

    def get(self, session_id: str) -> Session | None:
        """The session, or None if there is none (or it expired)."""
        self.expire()
        with self._lock:
            row = self._db.execute("SELECT * FROM sessions WHERE id = ? AND updated >= ?",
                                   (session_id, self._clock() - self._ttl_s)).fetchone()
            if row is None:
                return None
            rows = self._db.execute("SELECT * FROM messages WHERE session_id = ? ORDER BY seq",
                                    (session_id,)).fetchall()
        return Session(row["id"], row["preset"], row["system"], row["created"], row["updated"],
                       tuple(_message(r) for r in rows))

    def record(self, session_id: str, preset: str | None, system: str | None, new: list[dict], answer_text: str,
               answer: Answer, keep_last: int | None = None) -> None:
        """Append a turn (the request's messages and the answer); keep only the last `keep_last` messages."""
        now = self._clock()
        with self._transaction() as db:
            db.execute("INSERT INTO sessions (id, preset, system, created, updated) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT (id) DO UPDATE SET preset = excluded.preset, system = excluded.system, "
                       "updated = excluded.updated", (session_id, preset, system, now, now))
            db.executemany("INSERT INTO messages (session_id, role, content, created) VALUES (?, ?, ?, ?)",
                           [(session_id, m["role"], m["content"], now) for m in new])
            db.execute("INSERT INTO messages (session_id, role, content, model, prompt_tokens, completion_tokens, "
                       "context_messages, created) VALUES (?, 'assistant', ?, ?, ?, ?, ?, ?)",
                       (session_id, answer_text, answer.model, answer.prompt_tokens, answer.completion_tokens,
                        answer.context_messages, now))
            if keep_last is not None:
                db.execute("DELETE FROM messages WHERE session_id = ? AND seq NOT IN (SELECT seq FROM messages "
                           "WHERE session_id = ? ORDER BY seq DESC LIMIT ?)", (session_id, session_id, keep_last))

    def delete(self, session_id: str) -> bool:
        """Forget a session; whether there was one."""
        with self._transaction() as db:
            db.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
            return db.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _message(row: sqlite3.Row) -> dict:
    message = {"role": row["role"], "content": row["content"], "created_at": row["created"]}
    if row["role"] == "assistant":
        message.update(model=row["model"], prompt_tokens=row["prompt_tokens"],
                       completion_tokens=row["completion_tokens"], context_messages=row["context_messages"])
    return message


class SessionLocks:
    """One lock per session in use, so a session's requests run one after another (in no promised order)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: set[str] = set()

    def acquire(self, session_id: str, timeout_s: float) -> None:
        """Wait until no other request holds the session; 409 session_busy after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while session_id in self._held:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ApiError(409, "session_busy", f"session {session_id} is still answering another request",
                                   param="session_id")
                self._cond.wait(left)
            self._held.add(session_id)

    def release(self, session_id: str) -> None:
        with self._cond:
            self._held.discard(session_id)
            self._cond.notify_all()
