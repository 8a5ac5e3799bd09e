"""The PostgreSQL stores: sessions and transcripts, the outbox, shared by every replica.

They implement the same interfaces as the SQLite stores (bot.sessions.SessionStore, serve.outbox.Store)
on one SQLAlchemy engine (serve/database.py), so the chatbot and the outbox worker do not know
which backend they run on.

Sessions: `commit` is a compare-and-set on the revision, in one transaction with the turns it
appends: an INSERT that must not conflict for a new session (rev 0), else an UPDATE ... WHERE
rev = expected. The UPDATE takes the session's row lock, so the turns of one session are inserted
in commit order and `turns.seq` (a sequence) orders the transcript by commit. Two replicas
answering the same conversation at the same moment: one commits, the other gets SessionConflict
and the chatbot retries on the fresh state; no turn is lost or doubled.

Outbox: the statements are serve/outbox.py's, shared text; the claim adds `FOR UPDATE SKIP
LOCKED` on the candidate heads (re-checking, on the row's latest version, that it is still
pending and its lease free), then leases them, in one transaction. A conversation lock for the
webhook handlers is a transaction-level advisory lock on a connection held for the handler's
"reply + commit": a repeated delivery on another replica waits for the first and then finds its
keys, and a conversation's actions are queued in the order its replies were written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, text

from bot.sessions import (
    SQL_RECENT_TURNS,
    SessionConflict,
    SessionState,
    SessionStoreError,
    Turn,
    check_session_id,
    recent_turn_rows,
    transcript_rows,
)

from . import outbox as ob
from .database import DatabaseUnavailable, connect, unavailable_as

log = logging.getLogger("supportbot.postgres")


def lock_key(name: str) -> int:
    """A signed 64-bit advisory-lock key for a name (stable across processes, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "big", signed=True)


class PostgresSessionStore:
    """bot.sessions.SessionStore on PostgreSQL; safe from many threads (one pooled connection per call)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def load(self, session_id: str) -> SessionState:
        check_session_id(session_id)
        with unavailable_as("loading a session"), self.engine.connect() as conn:
            row = conn.execute(text("SELECT state, rev FROM sessions WHERE id = :id"), {"id": session_id}).fetchone()
        if row is None:
            return SessionState()
        try:
            return SessionState.from_json(row[0], int(row[1]))
        except (ValueError, TypeError, AttributeError) as exc:
            raise SessionStoreError(f"session {session_id!r} holds a damaged state ({exc})") from None

    def commit(self, session_id: str, state: SessionState, turns: list[Turn]) -> int:
        check_session_id(session_id)
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        params = {"id": session_id, "state": state.to_json(), "rev": state.rev, "now": now}
        with unavailable_as("committing a turn"), self.engine.begin() as conn:
            if state.rev == 0:
                done = conn.execute(text(
                    "INSERT INTO sessions (id, state, rev, created, updated) VALUES (:id, :state, 1, :now, :now) "
                    "ON CONFLICT (id) DO NOTHING"), params).rowcount
            else:
                done = conn.execute(text(
                    "UPDATE sessions SET state = :state, rev = rev + 1, updated = :now WHERE id = :id AND rev = :rev"
                ), params).rowcount
            if done != 1:
                raise SessionConflict(f"session {session_id!r} changed since revision {state.rev}")
            if turns:
                conn.execute(text(
                    "INSERT INTO turns (session_id, role, text, intent, confidence, action, model_version, at, "
                    "metadata) VALUES (:session_id, :role, :text, :intent, :confidence, :action, :model_version, "
                    ":at, :metadata)"),
                    [{"session_id": session_id, "role": t.role, "text": t.text, "intent": t.intent,
                      "confidence": float(t.confidence), "action": t.action, "model_version": t.model_version,
                      "at": t.at, "metadata": json.dumps(t.metadata, default=str)} for t in turns])
        return state.rev + 1

    def transcript(self, session_id: str, *, limit: int | None = None) -> list[dict[str, Any]]:
        check_session_id(session_id)
        query = ("SELECT role, text, intent, confidence, action, model_version, at, metadata FROM turns "
                 "WHERE session_id = :id ORDER BY seq DESC")
        params: dict[str, Any] = {"id": session_id}
        if limit is not None:
            query += " LIMIT :limit"
            params["limit"] = int(limit)
        with unavailable_as("reading a transcript"), self.engine.connect() as conn:
            rows = conn.execute(text(query), params).fetchall()
        return transcript_rows(rows)

    def exists(self, session_id: str) -> bool:
        check_session_id(session_id)
        with unavailable_as("reading a session"), self.engine.connect() as conn:
            return conn.execute(text("SELECT 1 FROM sessions WHERE id = :id"), {"id": session_id}).fetchone() is not None

    def recent_turns(self, limit: int) -> list[dict[str, Any]]:
        with unavailable_as("reading turns for review"), self.engine.connect() as conn:
            rows = conn.execute(text(SQL_RECENT_TURNS), {"limit": int(limit)}).fetchall()
        return recent_turn_rows(rows)

    def close(self) -> None:
        """The engine belongs to the runtime, which disposes of it."""


class PostgresOutboxStore:
    """serve.outbox.Store on PostgreSQL: every replica's worker claims from one table."""

    shared = True

    def __init__(self, engine: Engine, *, owner: str | None = None, lease_s: float = 60.0, max_locks: int = 16):
        self.engine = engine
        # Conversation locks hold a connection each for a handler's "reply + commit", while the
        # handler's own statements need connections too: the locks get a pool of their own, sized
        # to `max_locks` (the outbox lets no more wait on it), so they can never starve the work.
        self.max_locks = max_locks
        self._lock_engine = connect(engine.url.render_as_string(hide_password=False), pool_size=max_locks,
                                    max_overflow=0)
        self.owner = owner or ob.replica_id()
        self.lease_s = lease_s
        self._last_stats: tuple[int, float] = (0, 0.0)
        self._stats_lock = threading.Lock()

    def close(self) -> None:
        """The main engine belongs to the runtime, which disposes of it; the lock pool is ours."""
        self._lock_engine.dispose()

    @staticmethod
    def _seen(conn: Connection, keys: Sequence[str]) -> ob.Duplicate | None:
        for key in keys:
            row = conn.execute(text(ob.SQL_SEEN), {"key": key}).fetchone()
            if row is not None:
                return ob.Duplicate(key, json.loads(row[0]) if row[0] else None)
        return None

    def seen(self, keys: Sequence[str]) -> ob.Duplicate | None:
        with unavailable_as("reading dedupe keys"), self.engine.connect() as conn:
            return self._seen(conn, keys)

    def commit(self, keys: Sequence[str], actions: Sequence[ob.NewAction], *, now: float,
               result: dict[str, Any] | None = None) -> ob.Accepted | ob.Duplicate:
        """Keys and actions in one transaction. A key another replica is inserting at this moment
        makes this INSERT wait for it; then ON CONFLICT finds it and the delivery is a duplicate."""
        stored = json.dumps(result) if result is not None else None
        with unavailable_as("queueing a delivery"), self.engine.connect() as conn:
            with conn.begin() as tx:
                for key in keys:
                    inserted = conn.execute(text(ob.SQL_INSERT_SEEN + " ON CONFLICT (key) DO NOTHING"),
                                            {"key": key, "now": now, "result": stored}).rowcount
                    if inserted != 1:
                        tx.rollback()
                        break
                else:
                    ids = self._insert(conn, actions, now=now)
                    return ob.Accepted(ids)
            duplicate = self._seen(conn, keys)
        return duplicate or ob.Duplicate(keys[0], None)

    @staticmethod
    def _insert(conn: Connection, actions: Sequence[ob.NewAction], *, now: float) -> list[int]:
        return [
            int(conn.execute(text(ob.SQL_INSERT_ACTION), {
                "conversation": a.conversation, "kind": a.kind, "payload": json.dumps(a.payload),
                "priority": a.priority, "now": now}).scalar_one())
            for a in actions
        ]

    def heads(self, *, now: float, busy: set[str] | frozenset[str] = frozenset(), limit: int = 100) -> list[ob.Action]:
        """Claim due heads: candidates from the shared query, locked with SKIP LOCKED and re-checked
        on their latest version (another replica may have claimed or finished one meanwhile)."""
        with unavailable_as("claiming outbox actions"), self.engine.begin() as conn:
            rows = conn.execute(text(ob.SQL_HEADS), {"now": now, "limit": limit + len(busy)}).fetchall()
            ids = [int(r[0]) for r in rows if r[1] not in busy][:limit]
            if not ids:
                return []
            locked = conn.execute(text(
                f"SELECT {ob._ACTION_COLUMNS} FROM actions WHERE id = ANY(:ids) AND state = 'pending' "
                "AND (lease_until IS NULL OR lease_until <= :now) ORDER BY next_attempt_at, id "
                "FOR UPDATE SKIP LOCKED"), {"ids": ids, "now": now}).fetchall()
            claimed = []
            for row in locked:
                conn.execute(text(ob.SQL_LEASE), {"owner": self.owner, "until": now + self.lease_s, "now": now,
                                                  "yes": True, "id": row[0]})
                claimed.append(ob._action(row, now=now, reclaimed=row[8] is not None))
        return claimed

    def next_due_at(self, busy: set[str] | frozenset[str] = frozenset()) -> float | None:
        with unavailable_as("reading the outbox"), self.engine.connect() as conn:
            rows = conn.execute(text(ob.SQL_NEXT_DUE)).fetchall()
        return next((float(due) for conversation, due in rows if conversation not in busy), None)

    def _update(self, sql: str, params: dict[str, Any]) -> None:
        with unavailable_as("recording an outbox attempt"), self.engine.begin() as conn:
            conn.execute(text(sql), params)

    def mark_sent(self, action_id: int, *, now: float, receipt: str | None = None) -> None:
        self._update(ob.SQL_MARK_SENT, {"now": now, "receipt": receipt, "id": action_id})

    def mark_recovered(self, action_id: int, *, now: float, receipt: str | None = None) -> None:
        self._update(ob.SQL_MARK_RECOVERED, {"now": now, "receipt": receipt, "id": action_id})

    def last_receipt(self, action: ob.Action) -> str | None:
        with unavailable_as("reading the outbox"), self.engine.connect() as conn:
            row = conn.execute(text(ob.SQL_LAST_RECEIPT), {"conversation": action.conversation, "kind": action.kind,
                                                           "id": action.id}).fetchone()
        return None if row is None else str(row[0])

    def mark_retry(self, action_id: int, *, next_attempt_at: float, error: str, uncertain: bool = False) -> None:
        self._update(ob.SQL_MARK_RETRY, {"next": next_attempt_at, "error": error, "uncertain": uncertain,
                                         "id": action_id})

    def mark_failed(self, action_id: int, *, now: float, error: str,
                    follow_ups: Sequence[ob.NewAction] = ()) -> list[int]:
        with unavailable_as("recording an outbox failure"), self.engine.begin() as conn:
            conn.execute(text(ob.SQL_MARK_FAILED), {"now": now, "error": error, "id": action_id})
            return self._insert(conn, follow_ups, now=now)

    def release(self, action_ids: Sequence[int], *, now: float) -> None:
        with unavailable_as("releasing leases"), self.engine.begin() as conn:
            for action_id in action_ids:
                conn.execute(text(ob.SQL_RELEASE), {"now": now, "id": action_id, "owner": self.owner})

    def pending_stats(self, *, now: float) -> tuple[int, float]:
        """(pending, oldest age); the last known figures while the database does not answer (a
        metrics scrape must not fail because of it)."""
        try:
            with self.engine.connect() as conn:
                count, oldest = conn.execute(text(ob.SQL_PENDING_STATS)).fetchone()  # type: ignore[misc]
        except Exception:
            return self._last_stats
        stats = int(count), (max(0.0, now - float(oldest)) if oldest is not None else 0.0)
        self._last_stats = stats
        return stats

    def actions(self, state: str | None = None) -> list[dict[str, Any]]:
        with unavailable_as("reading the outbox"), self.engine.connect() as conn:
            result = conn.execute(text(ob.SQL_ACTIONS + (" WHERE state = :state" if state else "") + " ORDER BY id"),
                                  {"state": state})
            return ob.action_rows(result.fetchall(), list(result.keys()))

    def prune(self, *, now: float, retention_s: float) -> int:
        cutoff = now - retention_s
        with unavailable_as("pruning the outbox"), self.engine.begin() as conn:
            removed = conn.execute(text(ob.SQL_PRUNE_SEEN), {"cutoff": cutoff}).rowcount
            removed += conn.execute(text(ob.SQL_PRUNE_ACTIONS), {"cutoff": cutoff}).rowcount
        return int(removed)

    def try_lock(self, key: str) -> Connection | None:
        """The conversation's advisory lock on a connection of its own, or None when another holds it."""
        with unavailable_as("locking a conversation"):
            conn = self._lock_engine.connect()
        try:
            with unavailable_as("locking a conversation"):
                got = conn.execute(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": lock_key(key)}).scalar_one()
        except BaseException:
            conn.close()
            raise
        if not got:
            conn.rollback()
            conn.close()
            return None
        return conn

    def unlock(self, handle: Connection | None) -> None:
        if handle is None:
            return
        try:
            handle.rollback()  # ends the transaction: the advisory lock goes with it
        except Exception:  # a dead connection holds no lock either
            pass
        finally:
            handle.close()


__all__ = ["DatabaseUnavailable", "PostgresOutboxStore", "PostgresSessionStore", "lock_key"]
