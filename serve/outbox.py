"""A durable outbox: actions to send are committed to SQLite before a webhook is acknowledged,
and a worker delivers them with retries, in order per conversation, across restarts.

Why this shape:
- The webhook handler answers the platform within milliseconds; the platform's own retries are
  short and few (Chatwoot: 5 s timeout, 3 tries), so sending must not happen on that path.
- A delivery's dedupe keys and its actions go into the database in one transaction, so a retried
  or repeated delivery can never produce a second action, even after a restart.
- Each conversation is a queue: the worker sends only the head (lowest id) of each conversation's
  pending actions, one at a time, so replies arrive in the order the bot wrote them. A conversation
  whose head is backing off blocks only itself.
- An action is marked sent as soon as the receiver answers 2xx and is never sent again. Timeouts,
  connection errors, 429 and 5xx are retried with exponential backoff (with jitter, honouring
  Retry-After) up to `max_attempts`; other answers (4xx, 3xx) fail at once. A failure is recorded
  in the row (state `failed`, `last_error`), logged and counted.
- The one window where an action can be sent twice is a crash between the receiver's 2xx and our
  commit of it (milliseconds); no queue without receiver-side idempotency can close it.

One process per data directory: two workers over the same file would both send.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger("supportbot.outbox")

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


@dataclass(frozen=True)
class NewAction:
    """Something to send later: `kind` picks the sender, `conversation` the queue it waits in."""

    conversation: str
    kind: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Action:
    """A stored action, as the worker hands it to a sender."""

    id: int
    conversation: str
    kind: str
    payload: dict[str, Any]
    attempts: int
    created_at: float


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
    max_attempts: int = 8
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 300.0
    jitter: float = 0.2
    """The share of each delay that is random (0 = exact), so retries of many actions spread out."""

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the `attempts`-th failed attempt."""
        base = min(self.backoff_cap_s, self.backoff_base_s * 2 ** max(0, attempts - 1))
        base *= 1.0 - self.jitter * random.random()
        if retry_after is not None:
            base = max(base, min(retry_after, self.backoff_cap_s))
        return base


class OutboxStore:
    """The SQLite side: one connection, serialised by a lock, WAL, fsync on commit."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def seen(self, keys: Sequence[str]) -> Duplicate | None:
        """The first of `keys` already recorded, with its stored result (a fast pre-check)."""
        with self._lock:
            return self._seen(keys)

    def _seen(self, keys: Sequence[str]) -> Duplicate | None:
        for key in keys:
            row = self._db.execute("SELECT result FROM seen WHERE key = ?", (key,)).fetchone()
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
                stored = json.dumps(result) if result is not None else None
                self._db.executemany(
                    "INSERT INTO seen (key, seen_at, result) VALUES (?, ?, ?)", [(k, now, stored) for k in keys]
                )
                ids = []
                for action in actions:
                    cursor = self._db.execute(
                        "INSERT INTO actions (conversation, kind, payload, created_at, next_attempt_at) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (action.conversation, action.kind, json.dumps(action.payload), now, now),
                    )
                    ids.append(int(cursor.lastrowid))
                self._db.execute("COMMIT")
                return Accepted(ids)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def heads(self, *, now: float, busy: set[str] | frozenset[str] = frozenset(), limit: int = 100) -> list[Action]:
        """The head of each conversation's pending queue that is due now, oldest due first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT a.id, a.conversation, a.kind, a.payload, a.attempts, a.created_at, a.next_attempt_at "
                "FROM actions a JOIN (SELECT MIN(id) AS head FROM actions WHERE state = 'pending' "
                "GROUP BY conversation) h ON a.id = h.head WHERE a.next_attempt_at <= ? "
                "ORDER BY a.next_attempt_at, a.id",
                (now,),
            ).fetchall()
        actions = [
            Action(id=r[0], conversation=r[1], kind=r[2], payload=json.loads(r[3]), attempts=r[4], created_at=r[5])
            for r in rows if r[1] not in busy
        ]
        return actions[:limit]

    def next_due_at(self, busy: set[str] | frozenset[str] = frozenset()) -> float | None:
        """When the earliest conversation head not in `busy` becomes due (None: nothing pending)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT a.conversation, a.next_attempt_at FROM actions a JOIN (SELECT MIN(id) AS head FROM actions "
                "WHERE state = 'pending' GROUP BY conversation) h ON a.id = h.head ORDER BY a.next_attempt_at"
            ).fetchall()
        return next((due for conversation, due in rows if conversation not in busy), None)

    def mark_sent(self, action_id: int, *, now: float) -> None:
        self._update("UPDATE actions SET state = 'sent', attempts = attempts + 1, finished_at = ?, last_error = NULL "
                     "WHERE id = ?", (now, action_id))

    def mark_retry(self, action_id: int, *, next_attempt_at: float, error: str) -> None:
        self._update("UPDATE actions SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? WHERE id = ?",
                     (next_attempt_at, error, action_id))

    def mark_failed(self, action_id: int, *, now: float, error: str) -> None:
        self._update("UPDATE actions SET state = 'failed', attempts = attempts + 1, finished_at = ?, last_error = ? "
                     "WHERE id = ?", (now, error, action_id))

    def _update(self, sql: str, params: tuple) -> None:
        with self._lock:
            self._db.execute(sql, params)

    def pending_stats(self, *, now: float) -> tuple[int, float]:
        """(pending actions, age in seconds of the oldest one; 0 when none or when closed)."""
        with self._lock:
            try:
                count, oldest = self._db.execute(
                    "SELECT COUNT(*), MIN(created_at) FROM actions WHERE state = 'pending'"
                ).fetchone()
            except sqlite3.ProgrammingError:  # closed: the app has stopped
                return 0, 0.0
        return int(count), (max(0.0, now - oldest) if oldest is not None else 0.0)

    def actions(self, state: str | None = None) -> list[dict[str, Any]]:
        """Every stored action as a dict (for inspection and tests), in id order."""
        with self._lock:
            cursor = self._db.execute(
                "SELECT id, conversation, kind, payload, state, attempts, created_at, finished_at, last_error "
                "FROM actions" + (" WHERE state = ?" if state else "") + " ORDER BY id",
                (state,) if state else (),
            )
            columns = [c[0] for c in cursor.description]
            rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
        for row in rows:
            row["payload"] = json.loads(row["payload"])
        return rows

    def prune(self, *, now: float, retention_s: float) -> int:
        """Forget dedupe keys and finished actions older than the retention window."""
        cutoff = now - retention_s
        with self._lock:
            removed = self._db.execute("DELETE FROM seen WHERE seen_at < ?", (cutoff,)).rowcount
            removed += self._db.execute(
                "DELETE FROM actions WHERE state != 'pending' AND finished_at < ?", (cutoff,)
            ).rowcount
        return removed


class OutboxMetrics:
    """sent / retried / failed counters by kind, queue depth and the oldest pending action's age."""

    def __init__(self, registry: CollectorRegistry, store: OutboxStore, clock: Callable[[], float] = time.time):
        self.sent = Counter("supportbot_outbox_sent", "Outbox actions delivered (receiver answered 2xx)",
                            ["kind"], registry=registry)
        self.retried = Counter("supportbot_outbox_retried", "Outbox attempts that failed and will be retried",
                               ["kind"], registry=registry)
        self.failed = Counter("supportbot_outbox_failed", "Outbox actions given up on", ["kind"], registry=registry)
        depth = Gauge("supportbot_outbox_queue_depth", "Outbox actions waiting to be sent", registry=registry)
        age = Gauge("supportbot_outbox_oldest_pending_age_seconds", "Age of the oldest unsent outbox action",
                    registry=registry)
        depth.set_function(lambda: store.pending_stats(now=clock())[0])
        age.set_function(lambda: store.pending_stats(now=clock())[1])


Sender = Callable[[Action], Awaitable[httpx.Response]]
"""Sends one action and returns the receiver's response; transport errors propagate as httpx errors."""


@dataclass
class Outbox:
    """The worker over an OutboxStore: `submit()` from request handlers, `start()`/`stop()` in the lifespan."""

    store: OutboxStore
    senders: Mapping[str, Sender]
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    metrics: OutboxMetrics | None = None
    concurrency: int = 16
    retention_s: float = 7 * 24 * 3600.0
    housekeeping_s: float = 300.0
    clock: Callable[[], float] = time.time
    _wake: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _busy: dict[str, asyncio.Task] = field(default_factory=dict, init=False)
    _task: asyncio.Task | None = field(default=None, init=False)
    _last_prune: float = field(default=0.0, init=False)
    _stopping: bool = field(default=False, init=False)
    _held: dict[str, float] = field(default_factory=dict, init=False)  # conversation -> resume time
    _unrecorded: dict[int, str] = field(default_factory=dict, init=False)  # delivered action id -> conversation

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

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._wake = asyncio.Event()  # bound to the running loop
            self._task = asyncio.create_task(self._run(), name="supportbot-outbox")

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop taking new work, give in-flight sends `grace_s` to finish, cancel the rest (they stay pending)."""
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

    async def _run(self) -> None:
        while not self._stopping:
            try:
                timeout = await self._dispatch()
            except asyncio.CancelledError:
                raise
            except Exception:  # the database is unwell: say so and try again shortly, never die
                log.exception("outbox worker: dispatch failed; retrying in 1 s")
                timeout = 1.0
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    async def _dispatch(self) -> float:
        """Start every due head that fits; return how long to sleep unless woken."""
        self._wake.clear()
        if self._stopping:
            return 0.0
        now = self.clock()
        if now - self._last_prune >= self.housekeeping_s:
            self._last_prune = now
            await asyncio.to_thread(self.store.prune, now=now, retention_s=self.retention_s)
        await self._record_unrecorded(now)
        self._held = {c: until for c, until in self._held.items() if until > now}
        blocked = set(self._busy) | set(self._held) | set(self._unrecorded.values())
        free = self.concurrency - len(self._busy)
        if free > 0:
            for action in await asyncio.to_thread(self.store.heads, now=now, busy=blocked, limit=free):
                self._busy[action.conversation] = asyncio.create_task(self._attempt(action))
                blocked.add(action.conversation)
        wake_at = [self.clock() + self.housekeeping_s, *self._held.values()]
        if self._unrecorded:
            wake_at.append(self.clock() + 1.0)
        if len(self._busy) < self.concurrency:  # else a finishing send wakes us
            due = await asyncio.to_thread(self.store.next_due_at, blocked)
            if due is not None:
                wake_at.append(due)
        return max(0.0, min(wake_at) - self.clock())

    async def _record_unrecorded(self, now: float) -> None:
        """Retry recording sends the receiver accepted while the database refused the write."""
        for action_id, conversation in list(self._unrecorded.items()):
            try:
                await asyncio.to_thread(self.store.mark_sent, action_id, now=now)
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
        finally:
            self._busy.pop(action.conversation, None)
            self._wake.set()

    def _hold_after_db_error(self, action: Action, exc: Exception) -> None:
        """The send's outcome could not be stored. A delivered action must never go out again, so
        its conversation waits until the 'sent' mark is written; otherwise the conversation rests
        for the longest backoff instead of hammering the receiver with a state we cannot advance."""
        if isinstance(exc, _DeliveredUnrecorded):
            self._unrecorded[action.id] = action.conversation
            log.error("outbox action %s (%s) was delivered but could not be recorded (%s); holding %s until it is",
                      action.id, action.kind, type(exc).__name__, action.conversation)
        else:
            self._held[action.conversation] = self.clock() + self.policy.backoff_cap_s
            log.error("outbox action %s (%s): recording the attempt failed (%s); pausing %s for %.0f s",
                      action.id, action.kind, type(exc).__name__, action.conversation, self.policy.backoff_cap_s)

    async def _send_and_record(self, action: Action) -> None:
        sender = self.senders[action.kind]
        try:
            response = await sender(action)
        except httpx.TransportError as exc:  # timeouts, refused connections, broken responses
            failure = _Failure(f"{type(exc).__name__}: {exc}", type(exc).__name__, retryable=True)
        except Exception as exc:  # a bug or a bad payload: retrying cannot help
            log.error("outbox action %s (%s): the sender raised %s", action.id, action.kind, type(exc).__name__)
            failure = _Failure(f"{type(exc).__name__}: {exc}", type(exc).__name__, retryable=False)
        else:
            status = response.status_code
            if 200 <= status < 300:
                try:
                    await asyncio.to_thread(self.store.mark_sent, action.id, now=self.clock())
                except Exception as exc:
                    raise _DeliveredUnrecorded(type(exc).__name__) from exc
                if self.metrics:
                    self.metrics.sent.labels(action.kind).inc()
                return
            retryable = status == 429 or status >= 500
            failure = _Failure(f"HTTP {status}: {response.text[:200]}", f"HTTP {status}", retryable=retryable,
                               retry_after=_retry_after(response, now=self.clock()) if retryable else None)
        await self._after_failure(action, failure)

    async def _after_failure(self, action: Action, failure: _Failure) -> None:
        """Schedule the next attempt, or record the failure for good.

        The stored error keeps the receiver's answer for inspection; the log line names only the
        status or exception type (an answer or a URL may quote customer text or a callback token).
        """
        attempts = action.attempts + 1
        now = self.clock()
        if failure.retryable and attempts < self.policy.max_attempts:
            delay = self.policy.delay(attempts, failure.retry_after)
            await asyncio.to_thread(self.store.mark_retry, action.id, next_attempt_at=now + delay, error=failure.error)
            if self.metrics:
                self.metrics.retried.labels(action.kind).inc()
            log.warning("outbox action %s (%s, %s) attempt %d failed (%s); retrying in %.2f s",
                        action.id, action.kind, action.conversation, attempts, failure.summary, delay)
            return
        await asyncio.to_thread(self.store.mark_failed, action.id, now=now, error=failure.error)
        if self.metrics:
            self.metrics.failed.labels(action.kind).inc()
        reason = "gave up after the last allowed attempt" if failure.retryable else "not retryable"
        log.error("outbox action %s (%s, %s) failed after %d attempt(s), %s: %s",
                  action.id, action.kind, action.conversation, attempts, reason, failure.summary)


class _DeliveredUnrecorded(Exception):
    """The receiver accepted the action, but marking it sent failed."""


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
