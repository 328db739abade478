"""Sessions' fast tier: the history trim rules (pure), the SQLite store (a real file) and the request checks
through a store app whose worker is the FakeWorker."""

from __future__ import annotations

import threading
import time

import pytest

from model_store_server.config import load_store_config
from model_store_server.session_history import SessionBounds, bound_history, fit_tokens, prompt_budget, turns
from model_store_server.sessions import Answer, SessionLocks, SessionStore, check_session_id
from model_swap.config import ConfigError
from model_swap.errors import ApiError
from tests.support.store_harness import fake_store

SYSTEM = [{"role": "system", "content": "sys"}]


def _history(n: int, size: int = 10) -> list[dict]:
    out = []
    for i in range(n):
        out += [{"role": "user", "content": f"q{i}".ljust(size)}, {"role": "assistant", "content": f"a{i}".ljust(size)}]
    return out


def _counter(calls: list[int]):
    """Counts a token per character, in a context of 1000 (a stand-in for the worker's /tokenize)."""

    def count(messages: list[dict]) -> tuple[int, int]:
        calls.append(len(messages))
        return sum(len(m["content"]) for m in messages), 1000

    return count


def test_turns_start_at_each_user_message():
    history = [{"role": "assistant", "content": "orphan"}, *_history(2)]
    assert [len(t) for t in turns(history)] == [1, 2, 2]


def test_bound_history_drops_oldest_whole_turns_for_count_and_chars():
    new = [{"role": "user", "content": "now"}]
    kept = bound_history(SYSTEM, _history(5), new, SessionBounds(max_messages=6))
    assert kept == _history(5)[-4:]  # 1 + 4 + 1 messages
    kept = bound_history(SYSTEM, _history(5), new, SessionBounds(max_chars=3 + 3 + 40))
    assert kept == _history(5)[-4:]  # two turns of 20 characters beside the system prompt and the request
    assert bound_history(SYSTEM, _history(5), new, SessionBounds(max_chars=1)) == []


def test_fit_tokens_keeps_system_and_request_and_the_newest_turns():
    calls: list[int] = []
    new = [{"role": "user", "content": "now"}]
    sent = fit_tokens(SYSTEM, _history(20), new, SessionBounds(max_prompt_tokens=3 + 3 + 60), 8, _counter(calls))
    assert sent == [*SYSTEM, *_history(20)[-6:], *new]
    assert len(calls) <= 1 + 5  # one count, then a bisection over 20 turns, not one count per turn
    calls.clear()
    assert fit_tokens(SYSTEM, _history(2), new, SessionBounds(), 8, _counter(calls)) == [*SYSTEM, *_history(2), *new]
    assert len(calls) == 1
    # Nothing of the history fits: the system prompt and the request still go (the worker judges the rest).
    assert fit_tokens(SYSTEM, _history(3), new, SessionBounds(max_prompt_tokens=2), 8, _counter([])) == [*SYSTEM, *new]


def test_prompt_budget_leaves_room_for_the_answer():
    assert prompt_budget(SessionBounds(), 1000, 100) == 900
    assert prompt_budget(SessionBounds(), 1000, 5000) == 500  # at most half the context for the answer
    assert prompt_budget(SessionBounds(max_prompt_tokens=300), 1000, 100) == 300


@pytest.mark.parametrize("value", ["a", "A-1.b_c:d", "x" * 128])
def test_good_session_ids(value):
    assert check_session_id(value) == value


@pytest.mark.parametrize("value", ["", "x" * 129, "-x", "a/b", "a b", "..", "é", None, 3])
def test_bad_session_ids(value):
    with pytest.raises(ApiError) as err:
        check_session_id(value)
    assert err.value.code == "invalid_session_id" and err.value.status == 400


def _record(store: SessionStore, sid: str, text: str, keep_last: int | None = None) -> None:
    store.record(sid, "p", None, [{"role": "user", "content": text}], f"re {text}", Answer("m.gguf", 5, 2, 1),
                 keep_last)


def test_store_keeps_sessions_in_the_file_and_expires_idle_ones(tmp_path):
    now = [1000.0]
    db = tmp_path / "deep" / "sessions.db"
    store = SessionStore(db, ttl_s=60, clock=lambda: now[0])
    _record(store, "s1", "one")
    _record(store, "s1", "two", keep_last=3)
    store.close()
    again = SessionStore(db, ttl_s=60, clock=lambda: now[0])
    session = again.get("s1")
    assert session.preset == "p" and [m["content"] for m in session.messages] == ["re one", "two", "re two"]
    assert session.messages[-1]["model"] == "m.gguf" and session.messages[-1]["prompt_tokens"] == 5
    _record(again, "s2", "fresh")
    now[0] += 59
    _record(again, "s2", "still")
    now[0] += 2
    assert again.get("s1") is None  # idle 61 s: expired (and deleted)
    assert again.get("s2") is not None  # used 2 s ago
    assert not again.delete("s1")


def test_locks_serialize_one_session_and_time_out():
    locks = SessionLocks()
    locks.acquire("s", 1)
    locks.acquire("other", 1)  # another session does not wait
    with pytest.raises(ApiError) as err:
        locks.acquire("s", 0.05)
    assert err.value.code == "session_busy"
    threading.Timer(0.05, locks.release, args=("s",)).start()
    started = time.monotonic()
    locks.acquire("s", 5)
    assert time.monotonic() - started < 4


@pytest.mark.parametrize("env,message", [({"SESSION_MAX_MESSAGES": "1"}, "SESSION_MAX_MESSAGES"),
                                         ({"SESSION_MAX_MESSAGES": "300"}, "SESSION_MAX_MESSAGES"),
                                         ({"SESSION_MAX_CHARS": "0"}, "SESSION_MAX_CHARS"),
                                         ({"SESSION_MAX_PROMPT_TOKENS": "0"}, "SESSION_MAX_PROMPT_TOKENS"),
                                         ({"SESSION_TTL_S": "0"}, "SESSION_TTL_S")])
def test_session_settings_are_validated(env, message):
    with pytest.raises(ConfigError, match=message):
        load_store_config([], env)


def test_sessions_db_defaults_to_the_run_folder():
    assert str(load_store_config([], {"RUN_DIR": "/srv/run/8000"}).sessions_db) == "/srv/run/8000/sessions.db"
    assert str(load_store_config([], {"SESSIONS_DB": "/x/s.db"}).sessions_db) == "/x/s.db"


def test_sessions_and_presets_are_for_chats_only(tmp_path):
    app, _ = fake_store(tmp_path)
    client = app.test_client()
    for field in ({"session_id": "s1"}, {"preset": "p"}):
        r = client.post("/v1/completions", json={"model": "a.gguf", "prompt": "hi", **field})
        assert r.status_code == 400 and r.json["error"]["code"] == "invalid_request", field


def test_active_is_the_model_loaded_last_on_every_endpoint(tmp_path):
    app, fake = fake_store(tmp_path)
    client = app.test_client()
    for path in ("/v1/completions", "/user_request"):
        r = client.post(path, json={"model": "active", "prompt": "hi"})
        assert r.status_code == 404 and r.json["error"]["code"] == "no_active_model"
    for name in ("b.gguf", "a.gguf"):
        assert client.post("/user_request", json={"model": name, "prompt": "hi"}).status_code == 200
    r = client.post("/user_request", json={"model": "active", "prompt": "hi"})
    assert r.status_code == 200 and r.headers["X-Cache-Action"] == "already_loaded"
    assert fake.generations[-1] == "a.gguf"


def test_session_endpoints_refuse_bad_ids_and_unknown_sessions(tmp_path):
    app, _ = fake_store(tmp_path)
    client = app.test_client()
    assert client.get("/sessions/a%20b").json["error"]["code"] == "invalid_session_id"
    assert client.get("/sessions/none").status_code == 404
    r = client.delete("/sessions/none")
    assert r.status_code == 404 and r.json["error"]["code"] == "session_not_found"


def test_history_is_counted_on_the_leased_model_and_trimmed(tmp_path):
    """Through the store's routes (fake worker): the count comes after the load, on the model that answers,
    and the oldest turns go first while the system prompt stays."""
    from model_store_server.session_history import SessionBounds as Bounds

    app, fake = fake_store(tmp_path, session_bounds=Bounds(max_prompt_tokens=40))
    client = app.test_client()
    system = {"role": "system", "content": "be kind"}
    for i, model in enumerate(("a.gguf", "a.gguf", "b.gguf")):
        r = client.post("/v1/chat/completions", headers={"X-Session-Id": "s"}, json={
            "model": model, "max_tokens": 4, "messages": [*([system] if i == 0 else []),
                                                          {"role": "user", "content": f"{i} " + "x" * 40}]})
        assert r.status_code == 200, r.json
    assert fake.calls.index("load b.gguf") < fake.calls.index("tokenize b.gguf")
    model, sent = fake.sent[-1]
    assert model == "b.gguf" and sent[0] == system and sent[-1]["content"].startswith("2 ")
    # Stand-in counts: system 2, each question 11, each answer 3; both earlier turns (41) exceed 40, one fits.
    assert len(sent) == 4 and sent[1]["content"].startswith("1 ")
    session = client.get("/sessions/s").json
    assert session["system"] == "be kind" and len(session["messages"]) == 6
    assert [m["context_messages"] for m in session["messages"] if m["role"] == "assistant"] == [2, 4, 4]
