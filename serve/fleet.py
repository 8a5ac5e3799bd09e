"""One model version for the fleet: `supportbot promote DIR`, POST /v1/admin/promote, and the watcher
every replica runs.

A promotion verifies the bundle (manifest, every file's sha256: bot.bundle.load) and records
where it lies (a path every replica can read: shared storage), its version and the sha256 of its
manifest, with a generation number, in the database (`fleet_model`, one row). On PostgreSQL it
also sends NOTIFY supportbot_model; each replica LISTENs on a connection of its own and polls the
row every `fleet_poll_s` as the fallback (a dropped listener connection, a NOTIFY lost in a
restart), so every replica notices within the poll interval at worst and at once usually. On
SQLite (one machine, `--workers N` sharing one data folder) the row lives in fleet.sqlite3 and is
polled.

A replica that notices a new generation loads the bundle through the runtime's atomic reload and
checks that its manifest still has the promoted sha256; a bundle that fails (missing on this
machine, damaged, changed since promotion) is refused there once, logged and counted
(supportbot_reloads{result="failed"}), and the replica keeps serving what it had until the next
promotion (it does not load the refused bundle again at every poll). A reload already running
(an admin's) defers the promotion to the next look. A replica that
starts serves the fleet's promoted model when there is one, so a restart rejoins the fleet's version.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine, text

from bot import bundle as bundle_mod

from .database import unavailable_as
from .runtime_errors import ReloadInProgress, ServingError

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("supportbot.fleet")

CHANNEL = "supportbot_model"
FLEET_FILE = "fleet.sqlite3"

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS fleet_model (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    generation INTEGER NOT NULL,
    path TEXT NOT NULL,
    version TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    promoted_at REAL NOT NULL
);
"""
SQL_GET = "SELECT generation, path, version, sha256, promoted_at FROM fleet_model WHERE id = 1"
SQL_PROMOTE = (
    "INSERT INTO fleet_model (id, generation, path, version, sha256, promoted_at) "
    "VALUES (1, 1, :path, :version, :sha256, :now) ON CONFLICT (id) DO UPDATE SET "
    "generation = fleet_model.generation + 1, path = excluded.path, version = excluded.version, "
    "sha256 = excluded.sha256, promoted_at = excluded.promoted_at RETURNING generation"
)


@dataclass(frozen=True)
class FleetModel:
    generation: int
    path: str
    version: str
    sha256: str
    promoted_at: float


def manifest_sha256(path: Path) -> str:
    """The sha256 of a bundle's manifest (bundle.json lists every file's sha256: it names the content)."""
    return hashlib.sha256((Path(path) / bundle_mod.MANIFEST).read_bytes()).hexdigest()


def verify(path: Path) -> tuple[str, str]:
    """(version, manifest sha256) of a bundle that loads and verifies; BundleError otherwise."""
    bundle = bundle_mod.load(path)
    return bundle.version, manifest_sha256(Path(path))


class FleetStore:
    """The `fleet_model` row: on PostgreSQL (engine) or in data_dir/fleet.sqlite3."""

    def __init__(self, *, engine: Engine | None = None, sqlite_path: Path | None = None):
        if (engine is None) == (sqlite_path is None):
            raise ValueError("a FleetStore needs an engine or a SQLite path")
        self.engine = engine
        self.sqlite_path = sqlite_path
        if sqlite_path is not None:
            sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            with self._sqlite() as db:
                db.executescript(SQLITE_SCHEMA)

    def _sqlite(self) -> sqlite3.Connection:
        assert self.sqlite_path is not None
        return sqlite3.connect(self.sqlite_path, timeout=10.0)

    def get(self) -> FleetModel | None:
        if self.engine is not None:
            with unavailable_as("reading the fleet model"), self.engine.connect() as conn:
                row: Any = conn.execute(text(SQL_GET)).fetchone()
        else:
            db = self._sqlite()
            try:
                row = db.execute(SQL_GET).fetchone()
            finally:
                db.close()
        return FleetModel(int(row[0]), row[1], row[2], row[3], float(row[4])) if row else None

    def promote(self, path: Path) -> FleetModel:
        """Verify the bundle and record it as the fleet's model (BundleError when it does not verify)."""
        path = Path(path).resolve()
        version, sha256 = verify(path)
        now = time.time()
        params = {"path": str(path), "version": version, "sha256": sha256, "now": now}
        if self.engine is not None:
            with unavailable_as("promoting a model"), self.engine.begin() as conn:
                generation = int(conn.execute(text(SQL_PROMOTE), params).scalar_one())
                conn.execute(text("SELECT pg_notify(:channel, :payload)"),
                             {"channel": CHANNEL, "payload": str(generation)})
        else:
            db = self._sqlite()
            try:
                with db:
                    generation = int(db.execute(SQL_PROMOTE, params).fetchone()[0])
            finally:
                db.close()
        log.info("promoted model %s (generation %d) from %s", version, generation, path)
        return FleetModel(generation, str(path), version, sha256, now)


class FleetWatcher:
    """Notices promotions (NOTIFY, else polling) and hot-swaps the runtime's model to them."""

    def __init__(self, runtime: Runtime, store: FleetStore, *, listen_url: str | None, poll_s: float = 2.0):
        self.runtime = runtime
        self.store = store
        self.listen_url = listen_url
        self.poll_s = poll_s
        self.generation = 0  # the last generation acted on (applied or refused)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run(), name="supportbot-fleet")
        if self.listen_url:
            self._listener = threading.Thread(target=self._listen, args=(loop,), name="supportbot-listen", daemon=True)
            self._listener.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _listen(self, loop: asyncio.AbstractEventLoop) -> None:
        """LISTEN on a connection of its own; reconnects after a failure (polling covers the gap)."""
        import psycopg

        assert self.listen_url is not None
        while not self._stop.is_set():
            try:
                url = "postgresql://" + self.listen_url.split("://", 1)[1]  # libpq knows no "+driver" scheme
                with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            loop.call_soon_threadsafe(self._wake.set)
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.debug("fleet listener reconnecting after %s", type(exc).__name__)
                self._stop.wait(self.poll_s)

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: polling continues
                log.debug("fleet check failed: %s", type(exc).__name__)
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except TimeoutError:
                pass
            self._wake.clear()

    async def check(self) -> FleetModel | None:
        """Apply the recorded model when its generation is new to this replica."""
        record = await asyncio.to_thread(self.store.get)
        if record is None or record.generation <= self.generation:
            return record
        if record.sha256 == self.runtime.model_sha256:
            self.generation = record.generation
            return record
        try:
            await self.runtime.reload(Path(record.path), expect_sha256=record.sha256)
        except ReloadInProgress:  # another reload is running: try again at the next look
            return record
        except ServingError as exc:  # the bundle does not load here: refused once, not reloaded at every poll
            log.error("promoted model %s (generation %d) refused here; still serving %s: %s",
                      record.version, record.generation, self.runtime.model_version, exc)
        self.generation = record.generation
        return record


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1, max_length=4096,
                       description="bundle directory, on storage every replica can read")


class PromoteResponse(BaseModel):
    generation: int
    model: str
    model_version: str
    sha256: str
    previous_version: str | None = Field(None, description="what this replica served before")
    serving_here: bool = Field(..., description="whether this replica serves it now: false when a reload was "
                               "already running (it follows at the next look) or the bundle did not load here (logged)")


def build_fleet_router(admin_dependency: Any) -> APIRouter:
    """POST /v1/admin/promote: verify, record for the fleet, swap here at once (the others follow)."""
    from .errors import ApiError

    router = APIRouter()

    @router.post("/v1/admin/promote", response_model=PromoteResponse, tags=["operations"],
                 dependencies=[Depends(admin_dependency)],
                 responses={status: {"description": text_} for status, text_ in [
                     (400, "the body is not valid JSON"),
                     (401, "missing or wrong admin token"), (403, "promotion is off (no admin token)"),
                     (409, "a reload is already running"), (422, "the bundle does not verify"),
                     (503, "the database is unavailable")]})
    async def promote(body: PromoteRequest, request: Request) -> PromoteResponse:
        """Make a bundle the model of every replica sharing this database. A bundle that does not
        verify is refused (422) and the fleet stays on its version."""
        runtime = request.app.state.runtime
        if runtime.fleet is None:
            raise ApiError(503, "fleet_unavailable", "the fleet store is not open yet", {"Retry-After": "1"})
        previous = runtime.model_version
        try:
            record = await asyncio.to_thread(runtime.fleet.store.promote, Path(body.model))
        except bundle_mod.BundleError as exc:
            raise ApiError(422, "bundle_error", f"{exc} (the fleet stays on {previous})") from None
        except OSError as exc:
            raise ApiError(422, "bundle_error", f"{body.model}: {exc.strerror or exc}") from None
        except ValueError as exc:  # a path the OS cannot take (an embedded NUL)
            raise ApiError(422, "bundle_error", f"not a usable path: {exc}") from None
        await runtime.fleet.check()
        return PromoteResponse(generation=record.generation, model=record.path, model_version=record.version,
                               sha256=record.sha256, previous_version=previous,
                               serving_here=runtime.model_sha256 == record.sha256)

    return router
