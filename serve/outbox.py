"""A durable outbox: actions to send are committed to the database before a webhook is acknowledged,
and a delivery worker on every replica sends them with retries, in order per conversation, across
restarts and crashes.

Why this shape:
- The webhook handler answers the platform within milliseconds; the platform's own retries are
  short and few (Chatwoot: 5 s timeout, 3 tries), so sending must not happen on that path.
- A delivery's dedupe keys and its actions go into the database in one transaction, so a retried
  or repeated delivery can never produce a second action, even after a restart, and even when the
  repeat lands on another replica (the keys live in the shared database).
- Each conversation is a queue: a worker claims only the head (highest priority, then lowest id) of
  each conversation's pending actions, one at a time, so replies arrive in the order the bot wrote
  them. A conversation whose head is backing off blocks only itself.
- A claim is a lease (`lease_owner`, `lease_until`), taken in one transaction (SQLite: BEGIN
  IMMEDIATE; PostgreSQL: `FOR UPDATE SKIP LOCKED`), so among all replicas exactly one sends a
  conversation's head at a time. A replica that dies mid-send (SIGKILL) leaves its lease to
  expire; then any replica claims the row again. Such a reclaimed row, and a row whose last send
  timed out after the request went out, is `uncertain`: the platform may have it already. Before
  sending it again the worker asks the platform when it can (Chatwoot: the conversation's latest
  messages, `checkers`) and records it as sent when the reply is there.
- Each sent action keeps the platform's `receipt` (Chatwoot: the id of the message it created), so
  that check looks only at what the platform created after the conversation's previous delivered
  action: the bot often says the same thing twice in a row, and an earlier identical reply must
  never be taken for a lost one (a reply that never arrives is the one outcome worse than a double).
- An action is marked sent as soon as the receiver answers 2xx and is never sent again. Timeouts,
  connection errors, 429 and 5xx are retried with exponential backoff (capped, with jitter,
  honouring Retry-After) until the retry horizon has passed since the action was queued (hours by
  default: a platform outage of minutes must not silence the bot); other answers (4xx, 3xx) fail
  at once. A failure is recorded in the row (state `failed`, `last_error`), logged and counted, and
  `handoff(action)` may queue follow-ups at the head of the conversation (Chatwoot: open the
  conversation to human agents, so no customer waits on a bot that gave up).
- The window where an action can still be sent twice: a crash, or a timeout, between the
  receiver's 2xx and our commit of it, for a platform that cannot be asked what it has
  (generic callbacks carry a delivery id for the receiver to dedupe on). For Chatwoot, the check
  before a resend closes it: by receipt, or, for a conversation's first reply (no receipt before
  it), by text and time (Chatwoot's `created_at`, one-second resolution).

The SQL is shared text with `:name` parameters, run by the SQLite store here through `sqlite3`
and by the PostgreSQL store (serve/postgres.py) through SQLAlchemy; only the claim differs.

Why this outbox, extended with leases, and not a PostgreSQL job queue such as Procrastinate
(compared on its documented semantics, not run): its `queueing_lock` refuses a second job only
while the first is still waiting, so a platform retry after the reply went out would be queued
again (dedupe keys must outlive the send, for the retention window, and carry the first answer);
it is PostgreSQL-only, so the zero-setup SQLite path would keep this outbox anyway, two
implementations of one contract; and keys, actions and the delivery's acknowledgement must commit
in one transaction with our own tables. Extending ours cost one claim query, five columns and a
164-line store (serve/postgres.py), and its correctness is measured by the kill test
(tests/test_replicas.py: 1,000 deliveries, a SIGKILL, 0 lost, 0 doubled).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Protocol

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger("supportbot.outbox")

SQLITE_SCHEMA_VERSION = 3

SCHEMA = """
CREATE TABLE IF NOT EXISTS actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    finished_at REAL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS actions_queue ON actions (state, conversation, id);
CREATE TABLE IF NOT EXISTS seen (
    key TEXT PRIMARY KEY,
    seen_at REAL NOT NULL,
    result TEXT
);
CREATE INDEX IF NOT EXISTS seen_age ON seen (seen_at);
"""

# Columns of later versions, added to an older file in place: version 2 (leases, priority,
# uncertain sends), version 3 (receipts).
ADDED_COLUMNS = (
    ("priority", "INTEGER NOT NULL DEFAULT 0"),
    ("first_attempt_at", "REAL"),
    ("uncertain", "INTEGER NOT NULL DEFAULT 0"),
    ("lease_owner", "TEXT"),
    ("lease_until", "REAL"),
    ("receipt", "TEXT"),
)

# ---- the SQL both stores run (`:name` parameters: sqlite3 and SQLAlchemy's text() take them alike)

SQL_SEEN = "SELECT result FROM seen WHERE key = :key"
SQL_INSERT_SEEN = "INSERT INTO seen (key, seen_at, result) VALUES (:key, :now, :result)"
SQL_INSERT_ACTION = (
    "INSERT INTO actions (conversation, kind, payload, priority, created_at, next_attempt_at) "
    "VALUES (:conversation, :kind, :payload, :priority, :now, :now) RETURNING id"
)
_ACTION_COLUMNS = "id, conversation, kind, payload, attempts, created_at, first_attempt_at, uncertain, lease_owner"
SQL_HEADS = (
    f"SELECT {_ACTION_COLUMNS} FROM (SELECT a.*, ROW_NUMBER() OVER (PARTITION BY conversation "
    "ORDER BY priority DESC, id) AS place FROM actions a WHERE state = 'pending') h "
    "WHERE place = 1 AND next_attempt_at <= :now AND (lease_until IS NULL OR lease_until <= :now) "
    "ORDER BY next_attempt_at, id LIMIT :limit"
)
SQL_NEXT_DUE = (
    "SELECT conversation, CASE WHEN lease_until IS NOT NULL AND lease_until > next_attempt_at THEN lease_until "
    "ELSE next_attempt_at END AS due FROM (SELECT a.*, ROW_NUMBER() OVER (PARTITION BY conversation "
    "ORDER BY priority DESC, id) AS place FROM actions a WHERE state = 'pending') h WHERE place = 1 ORDER BY due"
)
SQL_LEASE = (
    "UPDATE actions SET lease_owner = :owner, lease_until = :until, "
    "first_attempt_at = COALESCE(first_attempt_at, :now), "
    "uncertain = CASE WHEN lease_owner IS NOT NULL THEN :yes ELSE uncertain END WHERE id = :id"
)
SQL_MARK_SENT = (
    "UPDATE actions SET state = 'sent', attempts = attempts + 1, finished_at = :now, last_error = NULL, "
    "receipt = :receipt, lease_owner = NULL, lease_until = NULL WHERE id = :id"
)
SQL_MARK_RECOVERED = (
    "UPDATE actions SET state = 'sent', finished_at = :now, receipt = :receipt, lease_owner = NULL, "
    "lease_until = NULL WHERE id = :id"
)
SQL_LAST_RECEIPT = (
    "SELECT receipt FROM actions WHERE conversation = :conversation AND kind = :kind AND id < :id "
    "AND state = 'sent' AND receipt IS NOT NULL ORDER BY id DESC LIMIT 1"
)
SQL_MARK_RETRY = (
    "UPDATE actions SET attempts = attempts + 1, next_attempt_at = :next, last_error = :error, uncertain = :uncertain, "
    "lease_owner = NULL, lease_until = NULL WHERE id = :id"
)
SQL_MARK_FAILED = (
    "UPDATE actions SET state = 'failed', attempts = attempts + 1, finished_at = :now, last_error = :error, "
    "lease_owner = NULL, lease_until = NULL WHERE id = :id"
)
SQL_RELEASE = "UPDATE actions SET lease_until = :now WHERE id = :id AND lease_owner = :owner AND state = 'pending'"
SQL_PENDING_STATS = "SELECT COUNT(*), MIN(created_at) FROM actions WHERE state = 'pending'"
SQL_ACTIONS = (
    "SELECT id, conversation, kind, payload, state, attempts, created_at, finished_at, last_error, priority, "
    "uncertain, lease_owner, receipt FROM actions"
)
SQL_PRUNE_SEEN = "DELETE FROM seen WHERE seen_at < :cutoff"
SQL_PRUNE_ACTIONS = "DELETE FROM actions WHERE state <> 'pending' AND finished_at < :cutoff"


def replica_id() -> str:
    """Who holds a lease: host, process and a random tag (a restarted process is someone new)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class NewAction:
    """Something to send later: `kind` picks the sender, `conversation` the queue it waits in.

    `priority` > 0 jumps the conversation's queue (a handoff after a failed reply)."""

    conversation: str
    kind: str
    payload: dict[str, Any]
    priority: int = 0


@dataclass(frozen=True)
class Action:
    """A claimed action, as the worker hands it to a sender."""

    id: int
    conversation: str
    kind: str
    payload: dict[str, Any]
    attempts: int
    created_at: float
    first_attempt_at: float | None = None
    uncertain: bool = False
    """An earlier send may have reached the receiver (it timed out, or its replica died mid-send)."""


def _action(row: Sequence[Any], *, now: float, reclaimed: bool) -> Action:
    return Action(id=int(row[0]), conversation=row[1], kind=row[2], payload=json.loads(row[3]),
                  attempts=int(row[4]), created_at=float(row[5]),
                  first_attempt_at=float(row[6]) if row[6] is not None else now,
                  uncertain=bool(row[7]) or reclaimed)


@dataclass(frozen=True)
class Accepted:
    """The delivery was new: its keys are recorded and its actions queued."""

    action_ids: list[int]


@dataclass(frozen=True)
class Duplicate:
    """One of the delivery's keys was seen before; `result` is what the first one stored."""

    key: str
    result: dict[str, Any] | None


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int | None = None
    """Attempts before giving up; None: only the horizon limits retries."""
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 300.0
    jitter: float = 0.2
    """The share of each delay that is random (0 = exact), so retries of many actions spread out."""
    horizon_s: float = 6 * 3600.0
    """How long after an action was queued retryable failures are still retried."""

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the `attempts`-th failed attempt."""
        base = min(self.backoff_cap_s, self.backoff_base_s * 2 ** min(60, max(0, attempts - 1)))
        base *= 1.0 - self.jitter * random.random()
        if retry_after is not None:
            base = max(base, min(retry_after, self.backoff_cap_s))
        return base

    def gives_up(self, attempts: int, queued_at: float, retry_at: float) -> bool:
        """True when the next attempt would be past the horizon, or past the attempt limit."""
        if self.max_attempts is not None and attempts >= self.max_attempts:
            return True
        return retry_at - queued_at > self.horizon_s


class Store(Protocol):
    """What the worker needs from a store (SQLite here, PostgreSQL in serve/postgres.py)."""

    owner: str
    lease_s: float
    shared: bool

    @property
    def max_locks(self) -> int | None:
        """How many conversation locks may be held at once (each holds a connection); None: no limit.

        Read-only here, so a store may declare it `int` (PostgreSQL) or `None` (SQLite)."""

    def seen(self, keys: Sequence[str]) -> Duplicate | None: ...
    def commit(self, keys: Sequence[str], actions: Sequence[NewAction], *, now: float,
               result: dict[str, Any] | None = None) -> Accepted | Duplicate: ...
    def heads(self, *, now: float, busy: set[str] | frozenset[str] = frozenset(), limit: int = 100) -> list[Action]: ...
    def next_due_at(self, busy: set[str] | frozenset[str] = frozenset()) -> float | None: ...
    def mark_sent(self, action_id: int, *, now: float, receipt: str | None = None) -> None: ...
    def mark_recovered(self, action_id: int, *, now: float, receipt: str | None = None) -> None: ...
    def last_receipt(self, action: Action) -> str | None: ...
    def mark_retry(self, action_id: int, *, next_attempt_at: float, error: str, uncertain: bool = False) -> None: ...
    def mark_failed(self, action_id: int, *, now: float, error: str,
                    follow_ups: Sequence[NewAction] = ()) -> list[int]: ...
    def release(self, action_ids: Sequence[int], *, now: float) -> None: ...
    def pending_stats(self, *, now: float) -> tuple[int, float]: ...
    def actions(self, state: str | None = None) -> list[dict[str, Any]]: ...
    def prune(self, *, now: float, retention_s: float) -> int: ...
    def try_lock(self, key: str) -> Any | None: ...
    def unlock(self, handle: Any) -> None: ...
    def close(self) -> None: ...


def action_rows(cursor_rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    rows = [dict(zip(columns, row, strict=True)) for row in cursor_rows]
    for row in rows:
        row["payload"] = json.loads(row["payload"])
        row["uncertain"] = bool(row["uncertain"])
    return rows


class OutboxStore:
    """The SQLite store: one connection per process, serialised by a lock, WAL, fsync on commit.

    Claims are leases taken inside BEGIN IMMEDIATE, so several processes on one data folder
    (`supportbot serve --workers N`) share the file without sending anything twice."""

    shared = False
    max_locks = None

    def __init__(self, path: Path, *, owner: str | None = None, lease_s: float = 60.0):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.owner = owner or replica_id()
        self.lease_s = lease_s
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._init_schema()

    def _init_schema(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SQLITE_SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"{self.path}: outbox schema {version} is newer than this supportbot "
                                            f"knows ({SQLITE_SCHEMA_VERSION})")
            if version == SQLITE_SCHEMA_VERSION:
                return
            self._db.executescript(SCHEMA)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                columns = {row[1] for row in self._db.execute("PRAGMA table_info(actions)")}
                for name, declaration in ADDED_COLUMNS:
                    if name not in columns:
                        self._db.execute(f"ALTER TABLE actions ADD COLUMN {name} {declaration}")
                self._db.execute("CREATE INDEX IF NOT EXISTS actions_heads ON actions (state, conversation, "
                                 "priority, id)")
                self._db.execute(f"PRAGMA user_version = {SQLITE_SCHEMA_VERSION}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def seen(self, keys: Sequence[str]) -> Duplicate | None:
        """The first of `keys` already recorded, with its stored result (a fast pre-check)."""
        with self._lock:
            return self._seen(keys)

    def _seen(self, keys: Sequence[str]) -> Duplicate | None:
        for key in keys:
            row = self._db.execute(SQL_SEEN, {"key": key}).fetchone()
            if row is not None:
                return Duplicate(key, json.loads(row[0]) if row[0] else None)
        return None

    def commit(self, keys: Sequence[str], actions: Sequence[NewAction], *, now: float,
               result: dict[str, Any] | None = None) -> Accepted | Duplicate:
        """Record a delivery's dedupe keys and queue its actions, atomically; or report the duplicate."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                duplicate = self._seen(keys)
                if duplicate is not None:
                    self._db.execute("ROLLBACK")
                    return duplicate
                ids = self._insert(keys, actions, now=now, result=result)
                self._db.execute("COMMIT")
                return Accepted(ids)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _insert(self, keys: Sequence[str], actions: Sequence[NewAction], *, now: float,
                result: dict[str, Any] | None) -> list[int]:
        stored = json.dumps(result) if result is not None else None
        self._db.executemany(SQL_INSERT_SEEN, [{"key": k, "now": now, "result": stored} for k in keys])
        ids = []
        for action in actions:
            row = self._db.execute(SQL_INSERT_ACTION, {
                "conversation": action.conversation, "kind": action.kind, "payload": json.dumps(action.payload),
                "priority": action.priority, "now": now}).fetchone()
            ids.append(int(row[0]))
        return ids

    def heads(self, *, now: float, busy: set[str] | frozenset[str] = frozenset(), limit: int = 100) -> list[Action]:
        """Claim (lease) the head of each conversation's pending queue that is due now, oldest due first."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(SQL_HEADS, {"now": now, "limit": limit + len(busy)}).fetchall()
                claimed: list[Action] = []
                for row in rows:
                    if row[1] in busy or len(claimed) >= limit:
                        continue
                    self._db.execute(SQL_LEASE, {"owner": self.owner, "until": now + self.lease_s, "now": now,
                                                 "yes": 1, "id": row[0]})
                    claimed.append(_action(row, now=now, reclaimed=row[8] is not None))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return claimed

    def next_due_at(self, busy: set[str] | frozenset[str] = frozenset()) -> float | None:
        """When the earliest conversation head not in `busy` becomes due or free (None: nothing pending)."""
        with self._lock:
            rows = self._db.execute(SQL_NEXT_DUE).fetchall()
        return next((due for conversation, due in rows if conversation not in busy), None)

    def mark_sent(self, action_id: int, *, now: float, receipt: str | None = None) -> None:
        self._update(SQL_MARK_SENT, {"now": now, "receipt": receipt, "id": action_id})

    def mark_recovered(self, action_id: int, *, now: float, receipt: str | None = None) -> None:
        """The receiver already had it (found by a check after an uncertain send): sent, no new attempt."""
        self._update(SQL_MARK_RECOVERED, {"now": now, "receipt": receipt, "id": action_id})

    def last_receipt(self, action: Action) -> str | None:
        """The receipt of the latest action of `action`'s kind delivered before it in its conversation."""
        with self._lock:
            row = self._db.execute(SQL_LAST_RECEIPT, {"conversation": action.conversation, "kind": action.kind,
                                                      "id": action.id}).fetchone()
        return None if row is None else str(row[0])

    def mark_retry(self, action_id: int, *, next_attempt_at: float, error: str, uncertain: bool = False) -> None:
        self._update(SQL_MARK_RETRY, {"next": next_attempt_at, "error": error, "uncertain": int(uncertain),
                                      "id": action_id})

    def mark_failed(self, action_id: int, *, now: float, error: str,
                    follow_ups: Sequence[NewAction] = ()) -> list[int]:
        """Record the failure for good and queue `follow_ups` (at the head of the queue), in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(SQL_MARK_FAILED, {"now": now, "error": error, "id": action_id})
                ids = self._insert([], follow_ups, now=now, result=None)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return ids

    def release(self, action_ids: Sequence[int], *, now: float) -> None:
        """Give up our leases at once (a stop cut the sends off): the rows are free, and uncertain."""
        with self._lock:
            for action_id in action_ids:
                self._db.execute(SQL_RELEASE, {"now": now, "id": action_id, "owner": self.owner})

    def _update(self, sql: str, params: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(sql, params)

    def pending_stats(self, *, now: float) -> tuple[int, float]:
        """(pending actions, age in seconds of the oldest one; 0 when none or when closed)."""
        with self._lock:
            try:
                count, oldest = self._db.execute(SQL_PENDING_STATS).fetchone()
            except sqlite3.ProgrammingError:  # closed: the app has stopped
                return 0, 0.0
        return int(count), (max(0.0, now - oldest) if oldest is not None else 0.0)

    def actions(self, state: str | None = None) -> list[dict[str, Any]]:
        """Every stored action as a dict (for inspection and tests), in id order."""
        with self._lock:
            cursor = self._db.execute(SQL_ACTIONS + (" WHERE state = :state" if state else "") + " ORDER BY id",
                                      {"state": state})
            columns = [c[0] for c in cursor.description]
            return action_rows(cursor.fetchall(), columns)

    def prune(self, *, now: float, retention_s: float) -> int:
        """Forget dedupe keys and finished actions older than the retention window."""
        cutoff = now - retention_s
        with self._lock:
            removed = self._db.execute(SQL_PRUNE_SEEN, {"cutoff": cutoff}).rowcount
            removed += self._db.execute(SQL_PRUNE_ACTIONS, {"cutoff": cutoff}).rowcount
        return removed

    def try_lock(self, key: str) -> Any | None:
        """A conversation lock across processes; SQLite's commit is atomic on its own, so none is needed."""
        return True

    def unlock(self, handle: Any) -> None:
        return None


class OutboxMetrics:
    """sent / retried / failed / recovered / handoff counters by kind, queue depth, oldest pending age."""

    def __init__(self, registry: CollectorRegistry, store: Store, clock: Callable[[], float] = time.time):
        self.sent = Counter("supportbot_outbox_sent", "Outbox actions delivered (receiver answered 2xx)",
                            ["kind"], registry=registry)
        self.retried = Counter("supportbot_outbox_retried", "Outbox attempts that failed and will be retried",
                               ["kind"], registry=registry)
        self.failed = Counter("supportbot_outbox_failed", "Outbox actions given up on", ["kind"], registry=registry)
        self.recovered = Counter(
            "supportbot_outbox_recovered", "Uncertain sends found already delivered by the receiver (not resent)",
            ["kind"], registry=registry)
        self.handoffs = Counter(
            "supportbot_outbox_handoffs", "Conversations handed to humans because a reply could not be delivered",
            ["kind"], registry=registry)
        depth = Gauge("supportbot_outbox_queue_depth", "Outbox actions waiting to be sent", registry=registry)
        age = Gauge("supportbot_outbox_oldest_pending_age_seconds", "Age of the oldest unsent outbox action",
                    registry=registry)
        depth.set_function(lambda: store.pending_stats(now=clock())[0])
        age.set_function(lambda: store.pending_stats(now=clock())[1])


Sender = Callable[[Action], Awaitable[httpx.Response]]
"""Sends one action and returns the receiver's response; transport errors propagate as httpx errors."""


@dataclass(frozen=True)
class Checker:
    """How to ask a receiver whether an uncertain action already arrived, for one kind of action."""

    find: Callable[[Action, str | None], Awaitable[str | None]]
    """(action, the receipt of the conversation's previous delivered action of this kind, if any) ->
    the receipt of the copy that arrived (its id at the receiver), or None: not there, send it."""
    receipt: Callable[[httpx.Response], str | None]
    """The receiver's id for what a 2xx answer says it created (None when the answer names none)."""


Handoff = Callable[[Action], Sequence[NewAction]]
"""The follow-ups to queue when an action fails for good (e.g. open the conversation to humans)."""

# Transport errors raised before the request can have reached the receiver: a retry is certain.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


@dataclass
class Outbox:
    """The worker over a store: `submit()` from request handlers, `start()`/`stop()` in the lifespan."""

    store: Store
    senders: Mapping[str, Sender]
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    metrics: OutboxMetrics | None = None
    concurrency: int = 16
    retention_s: float = 7 * 24 * 3600.0
    housekeeping_s: float = 300.0
    clock: Callable[[], float] = time.time
    checkers: Mapping[str, Checker] = field(default_factory=dict)
    handoff: Handoff | None = None
    poll_s: float = 1.0
    """How often an idle worker looks for work other processes queued (they cannot wake it)."""
    uncertain_delay_s: float = 0.0
    """The least wait before retrying an uncertain send: a platform that answered late is given this
    long to finish creating the message before the check looks for it (the send timeout)."""
    _wake: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _busy: dict[str, asyncio.Task] = field(default_factory=dict, init=False)
    _claimed: dict[str, int] = field(default_factory=dict, init=False)  # conversation -> action id in flight
    _task: asyncio.Task | None = field(default=None, init=False)
    _last_prune: float = field(default=0.0, init=False)
    _stopping: bool = field(default=False, init=False)
    _held: dict[str, float] = field(default_factory=dict, init=False)  # conversation -> resume time
    _unrecorded: dict[int, tuple[str, str | None]] = field(default_factory=dict, init=False)
    """Delivered actions whose 'sent' mark the database refused: id -> (conversation, receipt)."""
    _locks: weakref.WeakValueDictionary[str, asyncio.Lock] = field(default_factory=weakref.WeakValueDictionary,
                                                                   init=False)
    _lock_gate: asyncio.Semaphore | None = field(default=None, init=False)

    async def seen(self, keys: Sequence[str]) -> Duplicate | None:
        return await asyncio.to_thread(self.store.seen, keys)

    async def submit(self, keys: Sequence[str], actions: Sequence[NewAction],
                     result: dict[str, Any] | None = None) -> Accepted | Duplicate:
        """Commit a delivery (dedupe keys + actions, durably) and wake the worker."""
        unknown = {a.kind for a in actions} - set(self.senders)
        if unknown:
            raise ValueError(f"no sender for action kind(s) {sorted(unknown)}")
        outcome = await asyncio.to_thread(self.store.commit, keys, actions, now=self.clock(), result=result)
        if isinstance(outcome, Accepted) and outcome.action_ids:
            self._wake.set()
        return outcome

    @asynccontextmanager
    async def conversation(self, key: str, *, timeout_s: float = 10.0) -> AsyncIterator[None]:
        """Hold `key` (a conversation) against every other handler in the fleet: an asyncio lock in
        this process, then the store's lock across processes (PostgreSQL: an advisory lock), taken
        by polling so no thread waits on it. TimeoutError when it stays busy for `timeout_s`."""
        lock = self._locks.get(key)  # held by this frame while in use; dropped by the weak mapping after
        if lock is None:
            lock = asyncio.Lock()
            self._locks[key] = lock
        if self._lock_gate is None:
            self._lock_gate = asyncio.Semaphore(self.store.max_locks or 1_000_000)
        deadline = time.monotonic() + timeout_s
        async with lock, self._lock_gate:
            delay = 0.005
            while True:
                handle = await self._try_lock(key)
                if handle is not None:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"conversation {key!r} stayed busy for {timeout_s:.0f} s")
                await asyncio.sleep(delay)
                delay = min(0.1, delay * 2)
            try:
                yield
            finally:
                await asyncio.to_thread(self.store.unlock, handle)

    async def _try_lock(self, key: str) -> Any:
        """One attempt at the store's lock, in a thread. Cancelled meanwhile (a client gone, a shutdown),
        the thread still finishes: a lock it took then is handed straight back, never kept with no owner."""
        attempt = asyncio.ensure_future(asyncio.to_thread(self.store.try_lock, key))
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            attempt.add_done_callback(self._unlock_orphan)
            raise

    def _unlock_orphan(self, attempt: asyncio.Future) -> None:
        if attempt.cancelled() or attempt.exception() is not None or attempt.result() is None:
            return
        asyncio.get_running_loop().run_in_executor(None, self.store.unlock, attempt.result())

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._wake = asyncio.Event()  # bound to the running loop
            self._task = asyncio.create_task(self._run(), name="supportbot-outbox")

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop taking new work, give in-flight sends `grace_s` to finish, cancel the rest (they stay
        pending, their leases released so the next worker need not wait for them to expire)."""
        if self._task is None:
            return
        # A flag, not only cancel(): on Python 3.11 wait_for() can swallow a cancellation that
        # arrives as the event it waits on is set.
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=grace_s)
        except TimeoutError:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        inflight = list(self._busy.values())
        if inflight:
            _, late = await asyncio.wait(inflight, timeout=grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        cut_off = list(self._claimed.values())
        if cut_off:
            try:
                await asyncio.to_thread(self.store.release, cut_off, now=self.clock())
            except Exception as exc:  # their leases will expire instead
                log.warning("outbox: could not release %d lease(s) at stop (%s)", len(cut_off), type(exc).__name__)
            self._claimed.clear()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                timeout = await self._dispatch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is unwell: say so and try again shortly, never die
                log.error("outbox worker: dispatch failed (%s); retrying in 1 s", type(exc).__name__)
                timeout = 1.0
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    async def _dispatch(self) -> float:
        """Claim and start every due head that fits; return how long to sleep unless woken."""
        self._wake.clear()
        if self._stopping:
            return 0.0
        now = self.clock()
        if now - self._last_prune >= self.housekeeping_s:
            self._last_prune = now
            await asyncio.to_thread(self.store.prune, now=now, retention_s=self.retention_s)
        await self._record_unrecorded(now)
        self._held = {c: until for c, until in self._held.items() if until > now}
        blocked = set(self._busy) | set(self._held) | {c for c, _ in self._unrecorded.values()}
        free = self.concurrency - len(self._busy)
        if free > 0:
            for action in await asyncio.to_thread(self.store.heads, now=now, busy=blocked, limit=free):
                self._claimed[action.conversation] = action.id
                self._busy[action.conversation] = asyncio.create_task(self._attempt(action))
                blocked.add(action.conversation)
        wake_at = [self.clock() + min(self.housekeeping_s, self.poll_s), *self._held.values()]
        if self._unrecorded:
            wake_at.append(self.clock() + 1.0)
        if len(self._busy) < self.concurrency:  # else a finishing send wakes us
            due = await asyncio.to_thread(self.store.next_due_at, blocked)
            if due is not None:
                wake_at.append(due)
        return max(0.0, min(wake_at) - self.clock())

    async def _record_unrecorded(self, now: float) -> None:
        """Retry recording sends the receiver accepted while the database refused the write."""
        for action_id, (conversation, receipt) in list(self._unrecorded.items()):
            try:
                await asyncio.to_thread(self.store.mark_sent, action_id, now=now, receipt=receipt)
            except Exception:
                return
            del self._unrecorded[action_id]
            log.info("outbox action %s (%s) recorded as sent", action_id, conversation)

    async def _attempt(self, action: Action) -> None:
        try:
            await self._send_and_record(action)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._hold_after_db_error(action, exc)
            if not isinstance(exc, _DeliveredUnrecorded):  # free the row for after the hold (it is retried
                # as uncertain, checked first); with the database still away, the lease expires instead
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.store.release, [action.id], now=self.clock())
            self._claimed.pop(action.conversation, None)
        else:
            self._claimed.pop(action.conversation, None)
        finally:
            self._busy.pop(action.conversation, None)
            self._wake.set()

    def _hold_after_db_error(self, action: Action, exc: Exception) -> None:
        """The store failed: the send's outcome could not be stored, or the receipt an uncertain action's
        check needs could not be read. A delivered action must never go out again, so
        its conversation waits until the 'sent' mark is written; otherwise the conversation rests
        for the longest backoff instead of hammering the receiver with a state we cannot advance."""
        if isinstance(exc, _DeliveredUnrecorded):
            self._unrecorded[action.id] = (action.conversation, exc.receipt)
            log.error("outbox action %s (%s) was delivered but could not be recorded (%s); holding %s until it is",
                      action.id, action.kind, exc, action.conversation)
        else:
            self._held[action.conversation] = self.clock() + self.policy.backoff_cap_s
            log.error("outbox action %s (%s): the outbox store failed (%s); pausing %s for %.0f s",
                      action.id, action.kind, type(exc).__name__, action.conversation, self.policy.backoff_cap_s)

    def _checker_for(self, action: Action) -> Checker | None:
        """The receiver's check for an uncertain action (None: not uncertain, or the receiver cannot be asked)."""
        return self.checkers.get(action.kind) if action.uncertain else None

    async def _already_delivered(self, action: Action, previous: str | None) -> bool:
        """For an uncertain action: ask the receiver (when it can be asked) whether it has it; `previous`
        is the receipt of the conversation's last delivered action (the check looks after it)."""
        checker = self._checker_for(action)
        if checker is None:
            return False
        receipt = await checker.find(action, previous)
        if receipt is None:
            return False
        try:
            await asyncio.to_thread(self.store.mark_recovered, action.id, now=self.clock(),
                                    receipt=receipt or None)
        except Exception as exc:
            raise _DeliveredUnrecorded(type(exc).__name__, receipt) from exc
        if self.metrics:
            self.metrics.recovered.labels(action.kind).inc()
        log.warning("outbox action %s (%s, %s): an earlier uncertain send had arrived; not sending it again",
                    action.id, action.kind, action.conversation)
        return True

    async def _send_and_record(self, action: Action) -> None:
        sender = self.senders[action.kind]
        uncertain = action.uncertain
        # Read before the send's try: a database error here is the store's, not the send's (which would
        # fail the action for good); it reaches _attempt, which holds the conversation and tries again.
        previous = await asyncio.to_thread(self.store.last_receipt, action) if self._checker_for(action) else None
        try:
            if await self._already_delivered(action, previous):
                return
            response = await sender(action)
        except httpx.TransportError as exc:  # timeouts, refused connections, broken responses
            uncertain = uncertain or not isinstance(exc, _NOT_SENT)
            failure = _Failure(f"{type(exc).__name__}: {exc}", type(exc).__name__, retryable=True)
        except _DeliveredUnrecorded:
            raise
        except Exception as exc:  # a bug or a bad payload: retrying cannot help
            log.error("outbox action %s (%s): the sender raised %s", action.id, action.kind, type(exc).__name__)
            failure = _Failure(f"{type(exc).__name__}: {exc}", type(exc).__name__, retryable=False)
        else:
            status = response.status_code
            if 200 <= status < 300:
                receipt = self._receipt(action, response)
                try:
                    await asyncio.to_thread(self.store.mark_sent, action.id, now=self.clock(), receipt=receipt)
                except Exception as exc:
                    raise _DeliveredUnrecorded(type(exc).__name__, receipt) from exc
                if self.metrics:
                    self.metrics.sent.labels(action.kind).inc()
                return
            retryable = status == 429 or status >= 500
            uncertain = uncertain and status >= 500  # a 429 was refused; a 5xx may have half-happened
            failure = _Failure(f"HTTP {status}: {response.text[:200]}", f"HTTP {status}", retryable=retryable,
                               retry_after=_retry_after(response, now=self.clock()) if retryable else None)
        await self._after_failure(action, failure, uncertain=uncertain)

    def _receipt(self, action: Action, response: httpx.Response) -> str | None:
        """The receiver's id for what it created; None when it names none (a later check then falls
        back to text and time). Never raises: the action was delivered whatever the answer says."""
        checker = self.checkers.get(action.kind)
        if checker is None:
            return None
        try:
            return checker.receipt(response)
        except Exception:
            return None

    async def _after_failure(self, action: Action, failure: _Failure, *, uncertain: bool = False) -> None:
        """Schedule the next attempt, or record the failure for good (and queue the handoff).

        The stored error keeps the receiver's answer for inspection; the log line names only the
        status or exception type (an answer or a URL may quote customer text or a callback token).
        """
        attempts = action.attempts + 1
        now = self.clock()
        if failure.retryable:
            delay = self.policy.delay(attempts, failure.retry_after)
            if uncertain:
                delay = max(delay, self.uncertain_delay_s)
            if not self.policy.gives_up(attempts, action.created_at, now + delay):
                await asyncio.to_thread(self.store.mark_retry, action.id, next_attempt_at=now + delay,
                                        error=failure.error, uncertain=uncertain)
                if self.metrics:
                    self.metrics.retried.labels(action.kind).inc()
                log.warning("outbox action %s (%s, %s) attempt %d failed (%s); retrying in %.2f s",
                            action.id, action.kind, action.conversation, attempts, failure.summary, delay)
                return
        follow_ups = list(self.handoff(action)) if self.handoff is not None else []
        await asyncio.to_thread(self.store.mark_failed, action.id, now=now, error=failure.error,
                                follow_ups=follow_ups)
        if self.metrics:
            self.metrics.failed.labels(action.kind).inc()
            if follow_ups:
                self.metrics.handoffs.labels(action.kind).inc()
        reason = ("gave up at the retry horizon" if failure.retryable else "not retryable")
        log.error("outbox action %s (%s, %s) failed after %d attempt(s), %s: %s%s",
                  action.id, action.kind, action.conversation, attempts, reason, failure.summary,
                  "; the conversation is handed to humans" if follow_ups else "")


class _DeliveredUnrecorded(Exception):
    """The receiver accepted the action, but marking it sent failed."""

    def __init__(self, reason: str, receipt: str | None):
        super().__init__(reason)
        self.receipt = receipt


@dataclass(frozen=True)
class _Failure:
    error: str  # stored with the action
    summary: str  # logged
    retryable: bool
    retry_after: float | None = None


def _retry_after(response: httpx.Response, *, now: float) -> float | None:
    """Seconds asked for by a Retry-After header (delta-seconds or an HTTP date), if any."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None
