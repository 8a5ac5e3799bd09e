"""The shared database of a fleet: `SUPPORTBOT_DATABASE_URL`, its engine, and its versioned migrations.

Unset, every replica keeps its state in SQLite files in its data folder (sessions.sqlite3,
outbox.sqlite3, fleet.sqlite3): zero setup, one machine. Set to `postgresql://user:pass@host:port/db`,
sessions, transcripts, the outbox, the dedupe keys and the fleet's model version live in
PostgreSQL, and any number of replicas share them.

Why SQLAlchemy Core over psycopg 3, and not the ORM or raw psycopg: the stores are a handful of
hand-written statements (the SQL is the design: compare-and-set, `FOR UPDATE SKIP LOCKED`, leases),
so an ORM would only hide it; Core gives the connection pool with pre-ping (a replica survives a
database restart without its own reconnect logic) and one way to run the same `:name`-parameter
statements that the SQLite stores run through the standard library (serve/outbox.py's SQL is
shared text). The SQLite stores stay on `sqlite3`: no new dependency for the zero-setup path, and
no per-statement overhead on a single machine.

Why a small versioned-migrations table and not Alembic: the schema is ours alone, the steps are
a short list of DDL (below), and PostgreSQL runs DDL inside transactions. A table
`supportbot_schema(version, description, applied_at)` plus an advisory lock (replicas starting
together take turns; the first applies, the rest find nothing to do) gives what Alembic would:
ordered, recorded, idempotent upgrades, run at start-up and by `supportbot db upgrade`. Alembic
would add an ini file, an env.py and a scripts folder to ship in the wheel, and autogenerate has
no model to compare with. A database whose version is newer than this code knows is refused in
one line, before anything is written: an older replica must not write rows it does not understand.
Down-migrations are not offered: roll back by restoring a backup, as with any schema change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeGuard
from urllib.parse import urlsplit

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from bot.errors import SupportbotError

log = logging.getLogger("supportbot.database")

MIGRATION_LOCK = 0x5B0_7DB  # pg_advisory_xact_lock key of the migration step


class DatabaseError(SupportbotError):
    """A database that cannot be used (bad URL, unreachable, too new); the message is one line."""


class DatabaseUnavailable(DatabaseError):
    """The database did not answer while serving; callers answer 503 and retry later."""


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "sessions, turns, outbox, dedupe keys, fleet model", (
        """CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            rev BIGINT NOT NULL,
            created TEXT NOT NULL,
            updated TEXT NOT NULL)""",
        """CREATE TABLE turns (
            seq BIGSERIAL PRIMARY KEY,
            session_id TEXT NOT NULL,
            role TEXT NOT NULL,
            text TEXT NOT NULL,
            intent TEXT,
            confidence DOUBLE PRECISION NOT NULL,
            action TEXT NOT NULL,
            model_version TEXT NOT NULL,
            at TEXT NOT NULL,
            metadata TEXT NOT NULL)""",
        "CREATE INDEX turns_by_session ON turns (session_id, seq)",
        """CREATE TABLE actions (
            id BIGSERIAL PRIMARY KEY,
            conversation TEXT NOT NULL,
            kind TEXT NOT NULL,
            payload TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending',
            priority INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            created_at DOUBLE PRECISION NOT NULL,
            next_attempt_at DOUBLE PRECISION NOT NULL,
            first_attempt_at DOUBLE PRECISION,
            finished_at DOUBLE PRECISION,
            last_error TEXT,
            uncertain BOOLEAN NOT NULL DEFAULT FALSE,
            lease_owner TEXT,
            lease_until DOUBLE PRECISION)""",
        "CREATE INDEX actions_pending ON actions (conversation, priority DESC, id) WHERE state = 'pending'",
        "CREATE INDEX actions_finished ON actions (finished_at) WHERE state <> 'pending'",
        """CREATE TABLE seen (
            key TEXT PRIMARY KEY,
            seen_at DOUBLE PRECISION NOT NULL,
            result TEXT)""",
        "CREATE INDEX seen_age ON seen (seen_at)",
        """CREATE TABLE fleet_model (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            generation BIGINT NOT NULL,
            path TEXT NOT NULL,
            version TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            promoted_at DOUBLE PRECISION NOT NULL)""",
    )),
    Migration(2, "outbox receipts: the platform's id of each delivered action", (
        "ALTER TABLE actions ADD COLUMN receipt TEXT",
        "CREATE INDEX actions_receipts ON actions (conversation, id) WHERE receipt IS NOT NULL",
    )),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def is_postgres(url: str | None) -> TypeGuard[str]:
    """True for a PostgreSQL URL (and so, to the type checker, `url` is then a str); False for None or blank."""
    return bool(url) and urlsplit(str(url)).scheme.split("+")[0] in ("postgresql", "postgres")


def describe(url: str) -> str:
    """host:port/database of a URL, without user or password (for messages and logs)."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or 5432
    return f"{host}:{port}{parts.path or ''}"


def check_url(url: str) -> str:
    """The URL as SQLAlchemy's psycopg 3 dialect takes it; DatabaseError (one line) when it is not PostgreSQL."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+")[0]
    if scheme not in ("postgresql", "postgres") or (not parts.hostname and "host=" not in (parts.query or "")):
        raise DatabaseError("SUPPORTBOT_DATABASE_URL must look like postgresql://user:password@host:5432/database")
    return "postgresql+psycopg://" + url.split("://", 1)[1]


def connect(url: str, *, pool_size: int = 10, max_overflow: int | None = None, connect_timeout: float = 5.0,
            pool_timeout: float = 10.0) -> Engine:
    """A pooled engine for `url`; nothing is connected until first use (see `open_database`)."""
    return create_engine(
        check_url(url), pool_size=pool_size, max_overflow=pool_size if max_overflow is None else max_overflow,
        pool_pre_ping=True, pool_recycle=1800,
        pool_timeout=pool_timeout, connect_args={"connect_timeout": max(1, int(connect_timeout)),
                                       "application_name": "supportbot"},
    )


def open_database(url: str, *, upgrade: bool = True, pool_size: int = 10) -> Engine:
    """Connect, then upgrade the schema (or only check it); DatabaseError with one line naming the host."""
    engine = connect(url, pool_size=pool_size)
    try:
        if upgrade:
            upgrade_schema(engine)
        else:
            check_schema(engine)
    except OperationalError as exc:
        engine.dispose()
        raise DatabaseError(f"cannot reach the database at {describe(url)}: {_first_line(exc)}") from None
    except DatabaseError:
        engine.dispose()
        raise
    return engine


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return lines[0] if lines else type(cause).__name__


def _current_version(conn: Connection) -> int:
    conn.execute(text(
        "CREATE TABLE IF NOT EXISTS supportbot_schema (version INTEGER PRIMARY KEY, description TEXT NOT NULL, "
        "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    ))
    return int(conn.execute(text("SELECT COALESCE(MAX(version), 0) FROM supportbot_schema")).scalar_one())


def _refuse_newer(version: int, engine: Engine) -> None:
    if version > SCHEMA_VERSION:
        raise DatabaseError(
            f"the database at {describe(engine.url.render_as_string())} has schema version {version}, newer than "
            f"this supportbot knows ({SCHEMA_VERSION}): upgrade supportbot, or point it at another database"
        )


def upgrade_schema(engine: Engine) -> tuple[int, int]:
    """Apply the migrations the database lacks, in one transaction under an advisory lock; (from, to)."""
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        before = _current_version(conn)
        _refuse_newer(before, engine)
        for migration in MIGRATIONS:
            if migration.version <= before:
                continue
            for statement in migration.statements:
                conn.execute(text(statement))
            conn.execute(text("INSERT INTO supportbot_schema (version, description) VALUES (:v, :d)"),
                         {"v": migration.version, "d": migration.description})
            log.info("database schema upgraded to version %d: %s", migration.version, migration.description)
    return before, SCHEMA_VERSION


def check_schema(engine: Engine) -> int:
    """The database's schema version; DatabaseError when it is newer or older than this code."""
    with engine.begin() as conn:
        version = _current_version(conn)
    _refuse_newer(version, engine)
    if version < SCHEMA_VERSION:
        raise DatabaseError(f"the database at {describe(engine.url.render_as_string())} has schema version "
                            f"{version}; run `supportbot db upgrade` (this supportbot needs {SCHEMA_VERSION})")
    return version


def is_disconnect(exc: BaseException) -> bool:
    """True for errors that mean "the database is not answering" rather than a bug in a statement."""
    if isinstance(exc, OperationalError):
        return True
    if isinstance(exc, PoolTimeout):  # every pooled connection busy past pool_timeout: not answering now
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    try:
        import psycopg

        return isinstance(exc, psycopg.OperationalError)
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False


@contextmanager
def unavailable_as(what: str) -> Iterator[None]:
    """Turn connection-level failures inside the block into DatabaseUnavailable (one line, no SQL, no data)."""
    try:
        yield
    except DatabaseError:
        raise
    except Exception as exc:
        if is_disconnect(exc):
            raise DatabaseUnavailable(f"the database did not answer ({what}): {type(exc).__name__}") from None
        raise


class Health:
    """Whether this replica's database answered lately: set by every store call, read by /readyz.

    A failed call marks it down; `probe()` (run by the runtime every second while it is down) marks
    it up again when a `SELECT 1` succeeds, so readiness comes back without traffic."""

    def __init__(self, engine: Engine | None):
        self.engine = engine
        self.down_since: float | None = None
        self.reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.down_since is None

    def failed(self, reason: str) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.error("database unavailable: %s", reason)
        self.reason = reason

    def recovered(self) -> None:
        if self.down_since is not None:
            log.info("database available again after %.1f s", time.monotonic() - self.down_since)
        self.down_since = None
        self.reason = None

    def probe(self) -> bool:
        if self.engine is None:
            return True
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            self.failed(f"{type(exc).__name__}")
            return False
        self.recovered()
        return True


def run_upgrade_command(url: str | None) -> dict[str, Any]:
    """`supportbot db upgrade`: the summary of what was done (DatabaseError on failure)."""
    if not url:
        raise DatabaseError("SUPPORTBOT_DATABASE_URL is not set: the SQLite stores need no upgrade step "
                            "(they create their tables on first use)")
    engine = connect(url)
    try:
        before, after = upgrade_schema(engine)
    except OperationalError as exc:
        raise DatabaseError(f"cannot reach the database at {describe(url)}: {_first_line(exc)}") from None
    finally:
        engine.dispose()
    return {"database": describe(url), "schema before": before, "schema now": after,
            "migrations applied": after - before}
