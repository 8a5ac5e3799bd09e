"""The HTTP server around the app: one uvicorn configuration, a header timeout, an early-bound socket.

uvicorn has a keep-alive timeout (idle between requests) but no timeout for a request whose
headers never finish: a client that opens a connection and sends half a request line holds it
for ever, and a few thousand such clients hold every connection the server may have
(slowloris). `HeaderTimeoutProtocol` closes a connection whose request headers are not
complete `header_timeout_s` after the connection opened or its previous response finished,
as nginx's `client_header_timeout` does. A request being answered, or a body being sent, is
not timed by it.

`server_config` is the one place the server's limits are set (connections, backlog, timeouts,
trusted proxies), for `supportbot serve` and for the tests' live servers alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from bot.threads import serving_threads

from .errors import error_body
from .settings import Settings

log = logging.getLogger("supportbot.serve")


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus: a connection still waiting for complete request headers after
    `header_timeout` seconds is closed."""

    header_timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._track_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _track_headers(self) -> None:
        """Timed while the client has not finished a request's headers (h11: their state IDLE)."""
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self._header_timer is None:
                self._arm_header_timer()
        else:
            self._disarm_header_timer()

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout_expired)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout_expired(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def protocol_class(settings: Settings) -> type[HeaderTimeoutProtocol]:
    """The protocol class with this server's header timeout (uvicorn builds one instance per connection)."""
    return type("SupportbotHTTP", (HeaderTimeoutProtocol,), {"header_timeout": settings.header_timeout_s})


def server_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's configuration for `app`: limits, timeouts and proxies from the settings."""
    trusted = ",".join(settings.trusted_proxies)
    options: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "http": protocol_class(settings),
        "limit_concurrency": settings.max_connections, "backlog": settings.backlog,
        "timeout_keep_alive": settings.keep_alive_timeout_s, "timeout_graceful_shutdown": 15,
        "proxy_headers": bool(trusted), "forwarded_allow_ips": trusted or None, "server_header": False,
        "access_log": False, "lifespan": "on",
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


def bind_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when host is an IPv6 address).

    Bound before the model (and the web stack) is imported, so a client that connects during
    start-up waits in the backlog and then gets an answer (503 `not_ready` until the model is
    warm) instead of "connection refused": Chatwoot, for one, does not retry a refused delivery.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


class StartingApp:
    """The ASGI app uvicorn serves from the moment the port is bound.

    It builds the real app (`factory`: imports of torch and the model stack, the session store)
    in a thread and then runs the real app's lifespan; until that is done it answers by itself:
    `/healthz` 200, `/readyz` 503 `loading`, the webhooks 429 `not_ready` with Retry-After (the
    answer Chatwoot retries), anything else 503 `not_ready` with Retry-After. Afterwards every
    request goes straight to the real app, which answers 503 `not_ready` itself until its model
    is warm. A factory that fails stops the server through `on_failure` (one process: `run` stops
    uvicorn and exits 1; a `--workers` process exits with uvicorn's start-up failure code, on which
    the supervisor stops the others); until it has stopped, `/healthz` answers 503 `failed`.
    """

    STARTING = "the server is starting"
    FAILED = "the server failed to start"

    def __init__(self, factory: Any, on_failure: Any = None):
        self._factory = factory
        self._on_failure = on_failure  # called when the factory fails (run() stops the server)
        self.app: Any = None
        self._lifespan: Any = None
        self._boot: asyncio.Task[None] | None = None
        self.failed: BaseException | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._run_lifespan(receive, send)
            return
        app = self.app
        if app is not None:
            await app(scope, receive, send)
            return
        if scope["type"] == "http":
            await self._answer_starting(scope, send)

    async def _run_lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._boot = asyncio.get_running_loop().create_task(self._build(), name="supportbot-boot")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _build(self) -> None:
        try:
            app = await asyncio.to_thread(self._factory)
            lifespan = app.router.lifespan_context(app)
            await lifespan.__aenter__()
        except BaseException as exc:
            self.failed = exc
            log.error("the server failed to start: %s: %s", type(exc).__name__, exc)
            if self._on_failure is not None:
                self._on_failure()
            return
        self._lifespan = lifespan
        self.app = app

    async def _shutdown(self) -> None:
        if self._boot is not None and not self._boot.done():
            self._boot.cancel()
        if self._lifespan is not None:
            await self._lifespan.__aexit__(None, None, None)

    async def _answer_starting(self, scope: Any, send: Any) -> None:
        path, headers = scope["path"], [(b"content-type", b"application/json")]
        body: dict[str, Any]
        detail = self.STARTING if self.failed is None else self.FAILED
        if path == "/healthz":  # alive while starting; a process whose start failed is not
            status, body = (200, {"status": "ok"}) if self.failed is None else (503, {"status": "failed"})
        elif path == "/readyz":
            status = 503
            body = {"ready": False, "status": "loading" if self.failed is None else "failed", "model_version": None,
                    "detail": detail}
        else:
            status = 429 if path.startswith("/v1/webhooks/") else 503
            body = error_body("not_ready", f"not ready: {detail}")
            headers.append((b"retry-after", b"1"))
        payload = json.dumps(body).encode()
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else payload})


WORKER_ENV = "SUPPORTBOT_SERVE_ARGS"  # how `--workers N` hands the CLI's options to each worker process


def check_database(settings: Settings) -> None:
    """With a database URL: reachable, and its schema upgraded once here (not raced by workers);
    DatabaseError (one line naming the host, never the password) otherwise."""
    from .database import check_url, open_database

    if settings.database_url is None:
        return
    url = settings.database_url.get_secret_value()
    check_url(url)
    open_database(url, pool_size=1).dispose()


def worker_app() -> StartingApp:
    """The app of one `--workers` process (uvicorn imports this in each): the parent's settings,
    rebuilt from its options, behind a StartingApp as in a single process."""
    from .settings import load_settings

    options = json.loads(os.environ.get(WORKER_ENV) or "{}")
    config = options.pop("config", None)
    settings = load_settings(config, **options)
    HeaderTimeoutProtocol.header_timeout = settings.header_timeout_s  # the class uvicorn got by name

    def build() -> Any:
        from .app import create_app

        return create_app(settings)

    def failed() -> None:
        # A worker that cannot build its app must not stay up looking healthy: exit with the code uvicorn's
        # supervisor reads as "failed before it started serving" (it then stops every worker and itself, as
        # a single process stops; an older uvicorn restarts the worker instead, which logs the error again).
        from uvicorn.config import STARTUP_FAILURE

        logging.shutdown()
        os._exit(STARTUP_FAILURE)

    return StartingApp(build, on_failure=failed)


def run(model: Path | str | None = None, host: str | None = None, port: int | None = None,
        config: str | None = None, workers: int = 1) -> int:
    """`supportbot serve`: settings, a verified bundle, the database reachable, the port bound, then
    the app built behind it; with `workers` > 1, that many processes share the bound port.

    The order matters: the port is listening before torch and the model are imported, and
    `StartingApp` answers 503 `not_ready` during that time (see `bind_socket`)."""
    import logging.config
    import sys

    from bot import bundle as bundle_mod

    from .access_log import logging_config
    from .settings import SettingsError, load_settings

    overrides: dict[str, Any] = {"model": str(model) if model is not None else None, "host": host, "port": port}
    try:
        settings = load_settings(config, **overrides)
    except SettingsError as exc:
        print(f"supportbot serve: error: {exc}", file=sys.stderr)
        return 2
    if settings.model is None:
        print("supportbot serve: error: no model: pass --model or set SUPPORTBOT_MODEL", file=sys.stderr)
        return 2
    if workers < 1:
        print("supportbot serve: error: --workers must be at least 1", file=sys.stderr)
        return 2
    bundle_mod.load(settings.model)  # a damaged bundle stops here with a one-line BundleError
    check_database(settings)  # an unreachable or too new database stops here, in one line
    try:
        sock = bind_socket(settings.host, settings.port, settings.backlog)
    except OSError as exc:
        print(f"supportbot serve: error: cannot listen on {settings.host}:{settings.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 2
    log_config = logging_config(settings.log_level)
    logging.config.dictConfig(log_config)
    if workers > 1:
        return _run_workers(settings, sock, workers, log_config, {"config": config, **overrides})

    def build() -> Any:
        from .app import create_app  # torch and the model stack are imported here, behind the bound port

        return create_app(settings)

    server: uvicorn.Server

    def stop() -> None:
        server.should_exit = True

    starting = StartingApp(build, on_failure=stop)
    server = uvicorn.Server(server_config(starting, settings, log_config=log_config))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if starting.failed is not None:
        print(f"supportbot serve: error: the server failed to start: {starting.failed}", file=sys.stderr)
        return 1
    return 0


def _run_workers(settings: Settings, sock: socket.socket, workers: int, log_config: dict[str, Any],
                 options: dict[str, Any]) -> int:
    """`--workers N`: uvicorn's supervisor over N processes sharing the bound socket. Each process
    gets its share / N torch threads (unless `threads` is set; the share is bot.threads's: OMP_NUM_THREADS,
    else the cores this process may use), so together they use that share once."""
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    threads = settings.threads or max(1, serving_threads() // workers)
    os.environ[WORKER_ENV] = json.dumps({**options, "threads": threads})
    config = server_config("serve.server:worker_app", settings, factory=True, workers=workers,
                           http=HeaderTimeoutProtocol, log_config=log_config)
    log.info("%d worker processes on %s:%d, %d torch thread(s) each", workers, settings.host, settings.port, threads)
    supervisor = Multiprocess(config, sockets=[sock])
    try:
        supervisor.run()
    finally:
        sock.close()
    if any(worker.exitcode == STARTUP_FAILURE for worker in supervisor.processes):
        print("supportbot serve: error: a worker process failed to start (its error is logged above)", file=sys.stderr)
        return 1
    return 0
