"""Conversation state and transcripts behind a small store interface.

`SessionStore` is what the Chatbot needs: load a session's state, commit a new state together
with the turns that produced it (one transaction, refused when another writer got there first),
and read a transcript back. `SQLiteSessionStore` is the default: one file in the data folder
(bot.paths), WAL mode, a connection per thread, safe with concurrent writers in
threads and processes, and durable across restarts. A store for many replicas (Redis) fits the
same interface: `commit` is a compare-and-set on the state's revision plus an append.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from . import paths
from .errors import SupportbotError
from .validation import MAX_SESSION_ID_CHARS, InvalidSessionId, check_session_id

__all__ = [
    "MAX_SESSION_ID_CHARS", "InvalidSessionId", "Pending", "PendingChoice", "PendingFeedback", "PendingSlot", "SQLiteSessionStore",
    "SessionConflict", "SessionState",
    "SessionStore", "SessionStoreError", "Turn", "check_session_id", "default_sessions_path",
]

SCHEMA_VERSION = 1
APPLIED_KEYS = 64  # idempotency keys a session remembers (SessionState.applied)


class SessionConflict(SupportbotError, RuntimeError):
    """Another writer changed the session since it was loaded; reload and try again."""


class SessionStoreError(SupportbotError, RuntimeError):
    """The store cannot be opened or read (damaged file, foreign schema)."""


@dataclass(frozen=True)
class PendingChoice:
    """The bot asked the customer to pick one of `options` (intent names): after a clarify
    question, or fallback suggestions. `confidence` is the prediction's at the time."""

    options: tuple[str, ...]
    confidence: float | None = None
    KIND: ClassVar[str] = "choice"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, "options": list(self.options), "confidence": self.confidence}


@dataclass(frozen=True)
class PendingSlot:
    """The bot asked for `slot` (e.g. order_id) to answer `intent`; `confidence` is the answer's."""

    intent: str
    slot: str
    confidence: float = 0.0
    KIND: ClassVar[str] = "slot"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, "intent": self.intent, "slot": self.slot, "confidence": self.confidence}


@dataclass(frozen=True)
class PendingFeedback:
    """The bot quoted a help-centre passage and asked "Was this helpful?" (bot/knowledge.py)."""

    passage: str | None
    KIND: ClassVar[str] = "feedback"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, "passage": self.passage}


Pending = PendingChoice | PendingSlot | PendingFeedback


def pending_from_dict(data: object) -> Pending | None:
    """The pending state stored as JSON (`{"kind": "choice" | "slot", ...}`, the format since the
    first release). Something unreadable is dropped (None): the bot then simply does not expect
    an answer, which is safer than refusing the customer's conversation."""
    if not isinstance(data, dict):
        return None
    confidence = data.get("confidence")
    confidence = float(confidence) if isinstance(confidence, (int, float)) and not isinstance(confidence, bool) else None
    if data.get("kind") == PendingChoice.KIND:
        options = tuple(o for o in data.get("options") or [] if isinstance(o, str))
        return PendingChoice(options, confidence) if options else None
    if data.get("kind") == PendingSlot.KIND:
        intent, slot = data.get("intent"), data.get("slot")
        if isinstance(intent, str) and isinstance(slot, str):
            return PendingSlot(intent, slot, confidence or 0.0)
    if data.get("kind") == PendingFeedback.KIND:
        passage = data.get("passage")
        return PendingFeedback(passage if isinstance(passage, str) else None)
    return None


@dataclass
class SessionState:
    """What the dialogue remembers between messages.

    `pending` is what the bot is waiting for: a PendingChoice after a clarify question or
    fallback suggestions, a PendingSlot after asking for a detail, a PendingFeedback after a
    knowledge answer. `rev` is the store's revision (0: never saved), used for compare-and-set.

    `applied` holds the idempotency keys of the last APPLIED_KEYS messages (a platform's message
    id), committed with the turn they produced by the same compare-and-set. A delivery retried
    after its turn was committed, but before its reply reached the outbox (a replica killed
    between the two commits), is recognised here and replayed from the transcript instead of
    being answered twice. The outbox's dedupe keys cover the retries after that; so a short
    window of recent keys suffices, and the state stays small.
    """

    handed_off: bool = False
    fallbacks: int = 0  # consecutive fallbacks
    pending: Pending | None = None
    slots: dict[str, str] = field(default_factory=dict)
    turns: int = 0  # user messages so far (picks response variations)
    applied: tuple[str, ...] = ()  # idempotency keys of the latest messages, oldest first
    rev: int = 0

    def with_applied(self, key: str) -> SessionState:
        """This state, remembering `key` among the latest APPLIED_KEYS messages."""
        return replace(self, applied=(*self.applied, key)[-APPLIED_KEYS:])

    def to_json(self) -> str:
        data: dict[str, Any] = {"handed_off": self.handed_off, "fallbacks": self.fallbacks, "slots": self.slots, "turns": self.turns,
                "pending": self.pending.to_dict() if self.pending is not None else None}
        if self.applied:  # absent when empty: a state without keys reads the same as before they existed
            data["applied"] = list(self.applied)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, rev: int) -> SessionState:
        data = json.loads(text)
        return cls(
            handed_off=bool(data.get("handed_off", False)),
            fallbacks=int(data.get("fallbacks", 0)),
            pending=pending_from_dict(data.get("pending")),
            slots={str(k): str(v) for k, v in (data.get("slots") or {}).items()},
            turns=int(data.get("turns", 0)),
            applied=tuple(str(k) for k in data.get("applied") or ()),
            rev=rev,
        )


@dataclass
class Turn:
    """One line of a transcript."""

    role: str  # "user" | "bot"
    text: str
    intent: str | None
    confidence: float
    action: str
    model_version: str
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="milliseconds"))
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class SessionStore(Protocol):
    """Where sessions live. Implementations must be safe to call from many threads."""

    def load(self, session_id: str) -> SessionState:
        """The session's state; a fresh `SessionState()` (rev 0) for an unknown session."""
        ...

    def commit(self, session_id: str, state: SessionState, turns: list[Turn]) -> int:
        """Store `state` and append `turns` atomically, if the session is still at `state.rev`.

        Returns the new revision; raises SessionConflict when another writer committed first.
        """
        ...

    def transcript(self, session_id: str, *, limit: int | None = None) -> list[dict[str, Any]]:
        """The session's turns, oldest first (the last `limit` when given); [] for an unknown session."""
        ...

    def exists(self, session_id: str) -> bool: ...

    def recent_turns(self, limit: int) -> list[dict[str, Any]]:
        """The store's last `limit` turns over every session, oldest first, each with its `seq` and
        `session_id` (the review queue reads them: bot/review.py)."""
        ...

    def close(self) -> None: ...


def default_sessions_path() -> Path:
    """sessions.sqlite3 in the data folder (bot.paths: $SUPPORTBOT_DATA_DIR, else ./.supportbot)."""
    return paths.sessions_path()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    rev INTEGER NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS turns (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL,
    role TEXT NOT NULL,
    text TEXT NOT NULL,
    intent TEXT,
    confidence REAL NOT NULL,
    action TEXT NOT NULL,
    model_version TEXT NOT NULL,
    at TEXT NOT NULL,
    metadata TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS turns_by_session ON turns (session_id, seq);
"""


class SQLiteSessionStore:
    """Sessions in one SQLite file (WAL). Each thread gets its own connection; writes take the
    write lock up front (BEGIN IMMEDIATE) and wait up to `timeout` seconds for another writer."""

    def __init__(self, path: str | Path | None = None, *, timeout: float = 30.0):
        self.path = Path(path) if path is not None else default_sessions_path()
        self.timeout = timeout
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._guard = threading.Lock()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SessionStoreError(f"{self.path.parent}: cannot create the data folder: {exc.strerror or exc}") from None
        self._init_schema()

    # ---- connections -----------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise SessionStoreError(f"{self.path}: the session store is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.DatabaseError as exc:
                raise SessionStoreError(f"{self.path}: cannot open the session store: {exc}") from None
            self._local.conn = conn
            with self._guard:
                self._connections.append(conn)
        return conn

    def _init_schema(self) -> None:
        conn = self._conn()
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise SessionStoreError(f"{self.path}: session store schema {version} is not supported (this supportbot uses {SCHEMA_VERSION})")
            conn.executescript(_SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")
        except sqlite3.DatabaseError as exc:
            raise SessionStoreError(f"{self.path}: not a usable session store: {exc}") from None

    def close(self) -> None:
        with self._guard:
            self._closed = True
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    # ---- the interface ---------------------------------------------------------------------

    def load(self, session_id: str) -> SessionState:
        check_session_id(session_id)
        row = self._conn().execute("SELECT state, rev FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None:
            return SessionState()
        try:
            return SessionState.from_json(row[0], row[1])
        except (ValueError, TypeError, AttributeError) as exc:
            raise SessionStoreError(f"{self.path}: session {session_id!r} holds a damaged state ({exc})") from None

    def commit(self, session_id: str, state: SessionState, turns: list[Turn]) -> int:
        check_session_id(session_id)
        conn = self._conn()
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT rev FROM sessions WHERE id = ?", (session_id,)).fetchone()
            current = row[0] if row is not None else 0
            if current != state.rev:
                raise SessionConflict(f"session {session_id!r} changed (revision {current}, expected {state.rev})")
            conn.execute(
                "INSERT INTO sessions (id, state, rev, created, updated) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET state = excluded.state, rev = excluded.rev, updated = excluded.updated",
                (session_id, state.to_json(), current + 1, now, now),
            )
            conn.executemany(
                "INSERT INTO turns (session_id, role, text, intent, confidence, action, model_version, at, metadata) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (session_id, t.role, t.text, t.intent, float(t.confidence), t.action, t.model_version, t.at,
                     json.dumps(t.metadata, default=str))
                    for t in turns
                ],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return current + 1

    def transcript(self, session_id: str, *, limit: int | None = None) -> list[dict[str, Any]]:
        check_session_id(session_id)
        query = (
            "SELECT role, text, intent, confidence, action, model_version, at, metadata FROM turns "
            "WHERE session_id = ? ORDER BY seq DESC"
        )
        params: tuple[Any, ...] = (session_id,)
        if limit is not None:
            query += " LIMIT ?"
            params += (int(limit),)
        rows = self._conn().execute(query, params).fetchall()
        return transcript_rows(rows)

    def exists(self, session_id: str) -> bool:
        check_session_id(session_id)
        return self._conn().execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone() is not None

    def recent_turns(self, limit: int) -> list[dict[str, Any]]:
        rows = self._conn().execute(SQL_RECENT_TURNS, {"limit": int(limit)}).fetchall()
        return recent_turn_rows(rows)

    def __enter__(self) -> SQLiteSessionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Every store's turns table has these columns; sqlite3 and SQLAlchemy both bind `:name` parameters.
SQL_RECENT_TURNS = (
    "SELECT seq, session_id, role, text, intent, confidence, action, model_version, at, metadata FROM turns "
    "ORDER BY seq DESC LIMIT :limit"
)


def recent_turn_rows(rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """SQL_RECENT_TURNS rows (newest first) as turns, oldest first, with their seq and session_id."""
    return [{"seq": int(r[0]), "session_id": r[1], **turn} for r, turn in zip(reversed(rows), transcript_rows(
        [tuple(r[2:]) for r in rows]))]


def transcript_rows(rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """Transcript turns, oldest first, from (role, text, intent, confidence, action, model_version, at,
    metadata JSON) rows read newest first; every session store reads its rows in that shape."""
    return [
        {"role": r[0], "text": r[1], "intent": r[2], "confidence": r[3], "action": r[4], "model_version": r[5],
         "at": r[6], "metadata": json.loads(r[7])}
        for r in reversed(rows)
    ]
