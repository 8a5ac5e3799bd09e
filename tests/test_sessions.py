"""The SQLite session store: persistence across reopen, concurrent writers, compare-and-set."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import threading
from pathlib import Path

import pytest

from bot.sessions import (
    InvalidSessionId,
    PendingChoice,
    PendingSlot,
    SessionConflict,
    SessionState,
    SessionStore,
    SessionStoreError,
    SQLiteSessionStore,
    Turn,
    check_session_id,
    default_sessions_path,
)


def turn(text: str, role: str = "user") -> Turn:
    return Turn(role=role, text=text, intent="order_status", confidence=0.9, action="answer", model_version="v1")


def test_a_new_session_is_fresh(tmp_path):
    with SQLiteSessionStore(tmp_path / "s.sqlite3") as store:
        assert isinstance(store, SessionStore)
        assert store.load("nobody") == SessionState()
        assert store.transcript("nobody") == []
        assert not store.exists("nobody")


def test_state_and_transcript_survive_reopening(tmp_path):
    path = tmp_path / "s.sqlite3"
    with SQLiteSessionStore(path) as store:
        state = SessionState(fallbacks=1, pending=PendingSlot("order_status", "order_id"),
                             slots={"email": "a@b.co"}, turns=1)
        assert store.commit("s1", state, [turn("where is my order"), turn("What is your order number?", "bot")]) == 1
    with SQLiteSessionStore(path) as store:
        loaded = store.load("s1")
        assert loaded.rev == 1
        assert (loaded.fallbacks, loaded.pending, loaded.slots, loaded.turns) == (
            1, PendingSlot("order_status", "order_id"), {"email": "a@b.co"}, 1)
        lines = store.transcript("s1")
        assert [(t["role"], t["text"]) for t in lines] == [("user", "where is my order"), ("bot", "What is your order number?")]
        assert set(lines[0]) >= {"role", "text", "intent", "confidence", "action", "model_version", "at"}
        assert lines[0]["intent"] == "order_status" and lines[0]["model_version"] == "v1"
        assert store.transcript("s1", limit=1)[0]["role"] == "bot"
        assert store.exists("s1")
    journal = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert journal == "wal"


def test_commit_refuses_a_stale_state(tmp_path):
    with SQLiteSessionStore(tmp_path / "s.sqlite3") as store:
        first = store.load("s")
        store.commit("s", first, [turn("a")])
        with pytest.raises(SessionConflict):
            store.commit("s", first, [turn("b")])  # still at rev 0: someone else committed
        assert [t["text"] for t in store.transcript("s")] == ["a"]  # the refused turn is not stored


def _writer(store: SQLiteSessionStore, session: str, count: int, errors: list) -> None:
    try:
        for i in range(count):
            while True:
                state = store.load(session)
                state.turns += 1
                try:
                    store.commit(session, state, [turn(f"{threading.get_ident()}-{i}")])
                    break
                except SessionConflict:
                    continue
    except Exception as exc:
        errors.append(exc)


def test_concurrent_writers_from_threads_lose_nothing(tmp_path):
    store = SQLiteSessionStore(tmp_path / "s.sqlite3")
    errors: list = []
    threads = [threading.Thread(target=_writer, args=(store, session, 25, errors))
               for session in ("shared", "shared", "shared", "shared", "own-1", "own-2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    shared = store.load("shared")
    assert shared.turns == 100 and shared.rev == 100
    assert len(store.transcript("shared")) == 100
    assert store.load("own-1").turns == 25 and len(store.transcript("own-2")) == 25
    store.close()


def _process_writer(path: str, count: int) -> None:
    store = SQLiteSessionStore(Path(path))
    _writer(store, "shared", count, errors := [])
    store.close()
    if errors:
        raise SystemExit(1)


def test_concurrent_writers_from_processes_lose_nothing(tmp_path):
    path = tmp_path / "s.sqlite3"
    SQLiteSessionStore(path).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_process_writer, args=(str(path), 20)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    with SQLiteSessionStore(path) as store:
        assert store.load("shared").turns == 60
        assert len(store.transcript("shared")) == 60


@pytest.mark.parametrize("bad", ["", "   ", "x" * 129, "a\nb", "nul\x00", None, 42, "has spaces", "ünïcode ☕",
                                 "'; DROP TABLE sessions; --", "-starts-with-a-dash"])
def test_bad_session_ids_are_refused(bad, tmp_path):
    with pytest.raises(InvalidSessionId):
        check_session_id(bad)
    with SQLiteSessionStore(tmp_path / "s.sqlite3") as store, pytest.raises(InvalidSessionId):
        store.load(bad)


def test_any_identifier_shaped_id_is_accepted(tmp_path):
    with SQLiteSessionStore(tmp_path / "s.sqlite3") as store:
        for sid in ["chatwoot:42:7", "x" * 128, "generic:order-1.2_b", "alice@example.com", "7"]:
            store.commit(sid, store.load(sid), [turn("hi")])
            assert store.transcript(sid)[0]["text"] == "hi"


def test_a_damaged_file_gets_a_clear_error(tmp_path):
    path = tmp_path / "s.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(SessionStoreError, match=r"s\.sqlite3"):
        SQLiteSessionStore(path)


def test_a_closed_store_says_so(tmp_path):
    store = SQLiteSessionStore(tmp_path / "s.sqlite3")
    store.close()
    with pytest.raises(SessionStoreError, match="closed"):
        store.load("s")


def test_default_path_is_in_the_data_dir(_isolated_data_dir):
    assert default_sessions_path() == Path(_isolated_data_dir) / "sessions.sqlite3"


# Sessions stored by earlier releases (pending as a plain dict), byte for byte as they wrote them.
OLD_STATES = [
    ('{"fallbacks": 0, "handed_off": false, "pending": {"confidence": 0.91, "intent": "order_status", '
     '"kind": "slot", "slot": "order_id"}, "slots": {}, "turns": 1}', PendingSlot("order_status", "order_id", 0.91)),
    ('{"fallbacks": 1, "handed_off": false, "pending": {"confidence": 0.3, "kind": "choice", '
     '"options": ["order_status", "delivery_late"]}, "slots": {}, "turns": 2}',
     PendingChoice(("order_status", "delivery_late"), 0.3)),
    ('{"fallbacks": 0, "handed_off": true, "pending": null, "slots": {"email": "a@b.co"}, "turns": 3}', None),
]


@pytest.mark.parametrize("stored,pending", OLD_STATES)
def test_old_pending_state_json_still_loads_and_is_written_back_the_same(tmp_path, stored, pending):
    with SQLiteSessionStore(tmp_path / "s.sqlite3") as store:
        store.commit("old", SessionState(), [])
        with sqlite3.connect(store.path) as raw:
            raw.execute("UPDATE sessions SET state = ? WHERE id = 'old'", (stored,))
        state = store.load("old")
        assert state.pending == pending
        assert state.to_json() == stored  # the format did not change: older replicas can read it too


@pytest.mark.parametrize("pending", [{"kind": "telepathy"}, {"kind": "slot", "intent": 3}, "choice", [],
                                     {"kind": "choice", "options": []}])
def test_an_unreadable_pending_state_is_dropped_not_fatal(tmp_path, pending):
    with SQLiteSessionStore(tmp_path / "s.sqlite3") as store:
        store.commit("odd", SessionState(), [])
        with sqlite3.connect(store.path) as raw:
            raw.execute("UPDATE sessions SET state = ? WHERE id = 'odd'", (json.dumps({"pending": pending, "turns": 4}),))
        state = store.load("odd")
        assert state.pending is None and state.turns == 4
