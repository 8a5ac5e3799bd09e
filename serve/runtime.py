"""Everything one app serves with: settings, session store, current chatbot, batcher, metrics.

One `Runtime` lives on `app.state.runtime`; routes (and the webhook routes) reach it through
`get_runtime`. The chatbot is loaded and warmed in the background at start-up, so the server
answers /healthz at once and /readyz turns ready when a model can answer. A reload loads and
warms the new bundle beside the old one and then swaps one reference: batches already
running finish on the old model, the next batch runs on the new one, nothing is dropped.

The stores come from `SUPPORTBOT_DATABASE_URL` (serve/database.py): unset, SQLite files in the
data folder; set, PostgreSQL shared with the other replicas, its schema upgraded here at start-up.
While that database does not answer, /readyz says 503 and chat answers 503 `database_unavailable`
with Retry-After; a probe every second brings readiness back when the database returns.

The runtime speaks no HTTP: it raises domain errors (serve/runtime_errors.py, and bot's own such
as InvalidMessage or SessionConflict), and serve/errors.py's one table answers them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from fastapi import Request

from bot.bundle import BundleError
from bot.chatbot import Chatbot, Reply
from bot.classifier import Prediction, configure_threads
from bot.sessions import SessionStore, SQLiteSessionStore

from .access import SessionTokens
from .batching import Batcher, BatcherStopped, ClientBudget, QueueFull, split_bulk
from .database import DatabaseUnavailable, Health, is_postgres, open_database
from .fleet import FLEET_FILE, FleetStore, FleetWatcher, manifest_sha256
from .metrics import Metrics
from .runtime_errors import (
    NothingToReload,
    NotReady,
    Overloaded,
    ReloadFailed,
    ReloadInProgress,
    SessionNotFound,
    ShuttingDown,
)
from .schemas import ReloadResponse
from .settings import Settings

log = logging.getLogger("supportbot.serve")

Hook = Callable[["Runtime"], Awaitable[None]]

WARMUP_SHORT = 6
WARMUP_LONG = 2


def warmup_texts(chatbot: Chatbot) -> list[str]:
    """Texts to warm a bundle with, taken from the bundle itself: its intents' titles (short, like
    most messages) and its two longest answer texts (long ones), in the bundle's own language and
    domain. Warm-up runs them at the batch sizes traffic will use, so the first customers do not
    pay for lazy initialisation inside torch and the tokenizer; a bank's bundle is not warmed with
    a shop's phrases."""
    domain, labels = chatbot.domain, list(chatbot.classifier.labels)
    short = [domain.title(label) for label in labels[:WARMUP_SHORT]]
    answers = sorted({text for label in labels for text in domain.intent(label).texts}, key=len, reverse=True)
    return short + answers[:WARMUP_LONG]


class Runtime:
    """The serving state of one app; built in `create_app`, started and stopped by its lifespan."""

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        url = settings.database_url.get_secret_value() if settings.database_url is not None else None
        self.database_url = url
        self.engine = open_database(url, pool_size=settings.database_pool_size) if is_postgres(url) else None
        if url and self.engine is None:
            from .database import check_url

            check_url(url)  # raises a one-line DatabaseError for a URL that is not PostgreSQL
        self.health = Health(self.engine)
        self.store: SessionStore
        if self.engine is not None:
            from .postgres import PostgresSessionStore

            self.store = PostgresSessionStore(self.engine)
        else:
            self.store = SQLiteSessionStore(settings.sessions_path)
        self.fleet: FleetWatcher | None = None
        self.model_sha256: str | None = None
        self._health_task: asyncio.Task | None = None
        self.tokens = SessionTokens.from_settings(settings)  # the web page's session tokens (serve.access)
        self.text_budget = ClientBudget(settings.max_client_chars)  # classify text in flight per client
        self.batcher = Batcher(
            self._predict, max_size=settings.batch_max_size, max_wait_ms=settings.batch_max_wait_ms,
            max_queue=settings.max_queue, metrics=self.metrics,
        )
        self.model_path: Path | None = settings.model
        self.status: Literal["loading", "ready", "failed"] = "loading"
        self.load_error: str | None = None
        self._chatbot: Chatbot | None = None
        self._load_task: asyncio.Task | None = None
        self._reload_lock = asyncio.Lock()
        self._startup_hooks: list[Hook] = []
        self._shutdown_hooks: list[Hook] = []

    # ------------------------------------------------------------------ lifecycle

    def on_startup(self, hook: Hook) -> None:
        """Run `await hook(runtime)` when the app starts (after the batcher, while the model loads)."""
        self._startup_hooks.append(hook)

    def on_shutdown(self, hook: Hook) -> None:
        """Run `await hook(runtime)` when the app stops (in reverse order, before the batcher drains)."""
        self._shutdown_hooks.append(hook)

    async def start(self) -> None:
        if self.settings.metrics_token is None:
            log.warning("SUPPORTBOT_METRICS_TOKEN is not set: /metrics is open to anyone who can reach the server; "
                        "set it, or expose /metrics only to your monitoring network")
        configure_threads(self.settings.threads)
        self.batcher.start()
        fleet_store = (FleetStore(engine=self.engine) if self.engine is not None
                       else FleetStore(sqlite_path=self.settings.data_dir / FLEET_FILE))
        self.fleet = FleetWatcher(self, fleet_store, listen_url=self.database_url if self.engine is not None else None,
                                  poll_s=self.settings.fleet_poll_s)
        if self.engine is not None:
            self._health_task = asyncio.get_running_loop().create_task(self._watch_health(), name="supportbot-db")
        self._load_task = asyncio.get_running_loop().create_task(self._initial_load(), name="supportbot-load")
        for hook in self._startup_hooks:
            await hook(self)

    async def stop(self) -> None:
        for hook in reversed(self._shutdown_hooks):
            try:
                await hook(self)
            except Exception as exc:  # one failing hook must not keep the others from running
                log.error("shutdown hook %s failed: %s", getattr(hook, "__qualname__", hook), type(exc).__name__)
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.fleet is not None:
            await self.fleet.stop()
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        await self.batcher.stop()
        self.store.close()
        if self.engine is not None:
            self.engine.dispose()

    async def _watch_health(self) -> None:
        """Probe the database every second: readiness follows it both ways without traffic."""
        while True:
            await asyncio.to_thread(self.health.probe)
            await asyncio.sleep(1.0)

    def database_down(self, exc: DatabaseUnavailable) -> DatabaseUnavailable:
        """Record the outage (readiness turns 503) and the error to raise in its place: its text is for
        clients, the cause stays in the log (serve/errors.py answers 503 database_unavailable)."""
        self.health.failed(str(exc))
        return DatabaseUnavailable("the database is unavailable; retry shortly")

    async def wait_ready(self, timeout: float = 120.0) -> bool:
        """Wait for the start-up load; True when a model is being served."""
        if self._load_task is not None:
            await asyncio.wait_for(asyncio.shield(self._load_task), timeout)
        return self.status == "ready"

    async def _initial_load(self) -> None:
        """The fleet's promoted model when one is recorded (and loads here), else the configured one;
        then the fleet watcher starts, so later promotions swap the model in."""
        try:
            record = await asyncio.to_thread(self.fleet.store.get) if self.fleet is not None else None
        except Exception as exc:
            log.warning("could not read the fleet's model (%s); starting with the configured one", type(exc).__name__)
            record = None
        chatbot = None
        if record is not None:
            try:
                chatbot = await asyncio.to_thread(self._load_and_warm, Path(record.path), record.sha256)
                self.model_path = Path(record.path)
            except Exception as exc:
                log.error("the fleet's model %s (generation %d) does not load here (%s); starting with the "
                          "configured one", record.version, record.generation, _load_failure(exc))
            assert self.fleet is not None
            self.fleet.generation = record.generation  # applied, or refused here once (as the watcher refuses one)
        try:
            if chatbot is None:
                if self.model_path is None:
                    self._fail("no model configured: set SUPPORTBOT_MODEL or pass --model")
                    return
                try:
                    chatbot = await asyncio.to_thread(self._load_and_warm, self.model_path)
                except Exception as exc:
                    self._fail(_load_failure(exc))
                    return
            self._swap(chatbot)
            knowledge = chatbot.knowledge
            log.info("serving model %s from %s on %s%s", chatbot.version, self.model_path,
                     chatbot.classifier.backend_name,
                     f"; {len(knowledge.passages)} help-centre passages, scored in "
                     f"{str(knowledge.score_dtype).removeprefix('torch.')}" if knowledge is not None else "")
        finally:
            # also when no model loaded: a replica that failed to start serves the next promotion
            if self.fleet is not None:
                self.fleet.start()

    def _fail(self, message: str) -> None:
        if self._chatbot is None:
            self.status = "failed"
        self.load_error = message
        log.error("model not loaded: %s", message)

    def _load_and_warm(self, path: Path, expect_sha256: str | None = None) -> Chatbot:
        sha256 = manifest_sha256(path) if (path / "bundle.json").is_file() else None
        if expect_sha256 is not None and sha256 != expect_sha256:
            raise BundleError(f"bundle {path}: bundle.json differs from the promoted one (sha256 {str(sha256)[:12]}, "
                              f"promoted {expect_sha256[:12]})")
        chatbot = Chatbot.from_bundle(path, self.store, backend=self.settings.backend, num_threads=self.settings.threads,
                                      max_message_chars=self.settings.max_message_chars)
        chatbot.manifest_sha256 = sha256  # type: ignore[attr-defined]
        texts = warmup_texts(chatbot)
        for size in (1, len(texts), min(self.settings.batch_max_size, 64)):
            chatbot.classifier.predict((texts * (size // len(texts) + 1))[:size])
        return chatbot

    def _swap(self, chatbot: Chatbot) -> None:
        self._chatbot = chatbot  # one reference assignment: the swap is atomic for every reader
        self.model_sha256 = getattr(chatbot, "manifest_sha256", None)
        self.status = "ready"
        self.load_error = None
        self.metrics.set_model_version(chatbot.version)
        self.metrics.ready.set(1)

    # ------------------------------------------------------------------ serving

    @property
    def ready(self) -> bool:
        return self.status == "ready" and self.health.ok

    @property
    def not_ready_detail(self) -> str | None:
        if self.status != "ready":
            return self.load_error or "the model is loading"
        if not self.health.ok:
            return f"the database is unavailable ({self.health.reason})"
        return None

    @property
    def model_version(self) -> str | None:
        chatbot = self._chatbot
        return chatbot.version if chatbot is not None else None

    @property
    def chatbot(self) -> Chatbot:
        """The chatbot being served; NotReady while none is loaded."""
        chatbot = self._chatbot
        if chatbot is None:
            raise NotReady(f"not ready: {self.load_error or 'the model is still loading'}")
        return chatbot

    def _require_model(self) -> None:
        """Refuse (NotReady) before queueing when no model is loaded."""
        _ = self.chatbot

    def _predict(self, texts: list[str]) -> tuple[Chatbot, list[Prediction]]:
        """The batcher's forward pass: the current chatbot, read once per batch, and its predictions."""
        chatbot = self._chatbot
        if chatbot is None:
            raise RuntimeError("no model loaded")
        return chatbot, chatbot.classifier.predict(texts)

    async def respond(self, session_id: str, text: str, metadata: dict | None = None, *, key: str | None = None) -> Reply:
        """The bot's reply to one customer message, classified in a shared batch; `key` makes it
        idempotent (Chatbot.respond)."""
        self._require_model()

        def finish(chatbot: Chatbot, predictions: list[Prediction]) -> Reply:
            return chatbot.respond(session_id, text, prediction=predictions[0], metadata=metadata, key=key)

        try:
            reply: Reply = await self._submit([text], finish)
        except DatabaseUnavailable as exc:
            raise self.database_down(exc) from None
        self.metrics.predictions.labels(intent=reply.intent or "none", action=reply.action).inc()
        return reply

    async def classify(self, texts: Sequence[str]) -> tuple[str, list[Prediction]]:
        """(model version, predictions) for texts: bulk work, in chunks that chat messages go between
        (serve.batching). Chunks that ran on a model a reload has since replaced run again, so one
        answer comes from one model."""
        self._require_model()

        def finish(chatbot: Chatbot, predictions: list[Prediction]) -> tuple[str, list[Prediction]]:
            return chatbot.version, predictions

        chunks = split_bulk(texts, max_texts=self.settings.batch_max_size, max_chars=self.settings.bulk_chunk_chars)
        results = await self._submit_all(chunks, finish, bulk=True)
        for _ in range(3):
            stale = [i for i, (version, _) in enumerate(results) if version != results[-1][0]]
            if not stale:
                break
            redone = await self._submit_all([chunks[i] for i in stale], finish, bulk=True)
            for i, result in zip(stale, redone, strict=True):
                results[i] = result
        self.metrics.classified.inc(len(texts))
        return results[-1][0], [prediction for _, predictions in results for prediction in predictions]

    async def _submit(self, texts: list[str], finish: Callable[[Chatbot, list[Prediction]], Any]) -> Any:
        [result] = await self._submit_all([texts], finish)
        return result

    async def _submit_all(self, chunks: Sequence[list[str]], finish: Callable[[Chatbot, list[Prediction]], Any], *,
                          bulk: bool = False) -> list[Any]:
        """One request's chunks, admitted together or refused together (one rejection counted)."""
        try:
            return await self.batcher.submit_all(chunks, finish, bulk=bulk)
        except QueueFull:
            self.metrics.rejected.labels(reason="overloaded").inc()
            raise Overloaded("the server is busy; retry in a moment") from None
        except BatcherStopped:
            raise ShuttingDown("the server is shutting down") from None

    async def transcript(self, session_id: str) -> list[dict]:
        """The session's turns, oldest first; SessionNotFound when it has none."""
        try:
            turns = await asyncio.to_thread(self.chatbot.transcript, session_id)
        except DatabaseUnavailable as exc:
            raise self.database_down(exc) from None
        if not turns:
            raise SessionNotFound("no conversation has this session id")
        return turns

    # ------------------------------------------------------------------ reload

    async def reload(self, path: Path | None = None, *, expect_sha256: str | None = None) -> ReloadResponse:
        """Load and warm `path` (default: the bundle being served) and swap it in.

        A bundle that fails to load (or whose manifest is not `expect_sha256`, for a promotion)
        leaves the old model serving; the error goes to the caller.
        """
        if self._reload_lock.locked():
            raise ReloadInProgress("a reload is already running; try again when it has finished")
        async with self._reload_lock:
            target = path or self.model_path
            if target is None:
                raise NothingToReload("no model to reload: name a bundle directory in `model`")
            previous = self.model_version
            started = time.perf_counter()
            try:
                chatbot = await asyncio.to_thread(self._load_and_warm, target, expect_sha256)
            except Exception as exc:
                self.metrics.reloads.labels(result="failed").inc()
                message = _load_failure(exc)
                log.error("reload of %s failed; still serving %s: %s", target, previous, message)
                raise ReloadFailed(f"{message} (still serving {previous})") from None
            self._swap(chatbot)
            self.model_path = target
            self.metrics.reloads.labels(result="ok").inc()
            seconds = time.perf_counter() - started
            log.info("reloaded model %s -> %s from %s in %.2f s", previous, chatbot.version, target, seconds)
            return ReloadResponse(model_version=chatbot.version, previous_version=previous, model=str(target),
                                  seconds=round(seconds, 3))


def _load_failure(exc: Exception) -> str:
    """One line on why a bundle did not load (BundleError messages name the bad file)."""
    if isinstance(exc, BundleError):
        return str(exc)
    return f"the bundle could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


async def get_runtime(request: Request) -> Runtime:
    """FastAPI dependency: the app's runtime (async, so FastAPI does not hop to a thread for it)."""
    return request.app.state.runtime
