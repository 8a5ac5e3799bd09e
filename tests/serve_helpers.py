"""Helpers for tests of the HTTP service: settings for a test app, and a real uvicorn server on a
free loopback port in a background thread (shared with the webhook tests)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from serve.app import create_app
from serve.server import server_config
from serve.settings import Settings, load_settings


def make_settings(model: Path, data_dir: Path, **overrides: Any) -> Settings:
    """Test settings: the given bundle and data folder, no rate limit unless asked for."""
    overrides.setdefault("rate_limit_per_minute", 0)
    return load_settings(None, model=model, data_dir=data_dir, **overrides)


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1:<free port>, in a thread, with the lifespan running."""

    def __init__(self, app: FastAPI):
        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))  # the port is ours from here on: no race for it
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # The server `supportbot serve` runs (limits, header timeout, trusted proxies), on this socket.
        config = server_config(app, app.state.runtime.settings, log_config=None, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def runtime(self):
        return self.app.state.runtime

    def start(self, *, ready_timeout: float = 180.0, wait_ready: bool = True) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + ready_timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        if wait_ready:
            while httpx.get(f"{self.url}/readyz", timeout=10).status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not ready after {ready_timeout} s: {httpx.get(f'{self.url}/readyz').text}")
                time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()


@contextmanager
def live_server(settings: Settings, *, wait_ready: bool = True) -> Iterator[LiveServer]:
    server = LiveServer(create_app(settings)).start(wait_ready=wait_ready)
    try:
        yield server
    finally:
        server.stop()


@asynccontextmanager
async def asgi_client(app: FastAPI, *, start: bool = True, client: tuple[str, int] = ("127.0.0.1", 50000)):
    """An httpx client calling `app` in-process; `start` runs its lifespan and waits for the model."""
    transport = httpx.ASGITransport(app=app, client=client)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        if not start:
            yield http
            return
        async with app.router.lifespan_context(app):
            await app.state.runtime.wait_ready()
            yield http


def run_async(coro):
    return asyncio.run(coro)
