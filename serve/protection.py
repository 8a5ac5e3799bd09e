"""What keeps the public API safe: body size limit, API key, admin and metrics tokens (rate limits: serve.ratelimit).

Keys are compared with `hmac.compare_digest` (constant time) and never logged.
"""

from __future__ import annotations

import hmac
import json

from fastapi import Request
from pydantic import SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, error_body
from .metrics import Metrics

_BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


class BodyLimitMiddleware:
    """Answers 413 (in the API's error shape) to a request body over `max_bytes`.

    Memory stays bounded: a body is kept only up to the limit. Before answering 413 the rest
    of an oversized body is read and dropped, up to `drain_bytes`: a server that answers and
    closes while the client is still sending makes the kernel reset the connection, and the
    client then sees "connection reset" instead of the 413 (nginx's lingering close, for
    the same reason). A body larger still is answered without draining.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, metrics: Metrics, drain_bytes: int | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = 16 * max_bytes if drain_bytes is None else drain_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            if declared <= self.drain_bytes:
                await _drain(receive, self.drain_bytes)
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await _drain(receive, self.drain_bytes - size)
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        self.metrics.rejected.labels(reason="body_too_large").inc()
        payload = json.dumps(
            error_body("payload_too_large", f"the request body is larger than {self.max_bytes:,} bytes")
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                   (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


async def _drain(receive: Receive, budget: int) -> None:
    """Reads and drops the rest of a request body, at most `budget` bytes of it."""
    while budget > 0:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def presented_key(request: Request) -> str | None:
    """The key a client sent: `Authorization: Bearer KEY` or `X-API-Key: KEY`."""
    authorization = request.headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.headers.get("x-api-key") or None


def key_matches(presented: str | None, expected: SecretStr) -> bool:
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), expected.get_secret_value().encode("utf-8"))


def bearer_matches(request: Request, expected: SecretStr) -> bool:
    """`Authorization: Bearer TOKEN` with the expected token (bearer only: tokens are not API keys)."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and key_matches(credentials.strip() or None, expected)


def check_admin_token(request: Request, expected: SecretStr | None, metrics: Metrics) -> None:
    if expected is None:
        raise ApiError(403, "admin_disabled", "admin routes are off: set SUPPORTBOT_ADMIN_TOKEN to enable them")
    if not bearer_matches(request, expected):
        metrics.rejected.labels(reason="admin_token").inc()
        raise ApiError(401, "unauthorized", "send the admin token as `Authorization: Bearer TOKEN`",
                       {"WWW-Authenticate": "Bearer"})


def check_metrics_token(request: Request, expected: SecretStr | None, metrics: Metrics) -> None:
    """No token configured: open, for a scraper on a private network. Else the bearer token."""
    if expected is None:
        return
    if not bearer_matches(request, expected):
        metrics.rejected.labels(reason="metrics_token").inc()
        raise ApiError(401, "unauthorized", "send the metrics token as `Authorization: Bearer TOKEN`",
                       {"WWW-Authenticate": "Bearer"})
