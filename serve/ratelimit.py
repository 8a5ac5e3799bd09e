"""Rate limits: a token bucket per client, in memory, bounded in size; applied by `RateLimitMiddleware`."""

from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_body
from .metrics import Metrics
from .protection import key_matches
from .settings import Settings


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Allows `burst` requests at once and `per_minute` sustained, per client key.

    `check(key)` returns 0.0 when the request may go ahead, else the seconds until it would.
    The least recently seen clients are forgotten beyond `max_clients`, so a flood of
    addresses cannot grow memory without bound (a forgotten client starts with a full bucket).
    """

    def __init__(
        self, per_minute: float, burst: int, *, max_clients: int = 100_000, clock: Callable[[], float] = time.monotonic
    ):
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def check(self, key: str) -> float:
        if not self.enabled:
            return 0.0
        now = self._clock()
        with self._lock:
            bucket = self._buckets.pop(key, None) or _Bucket(self.burst, now)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate

    @staticmethod
    def retry_after_header(wait: float) -> str:
        """Whole seconds, rounded up (Retry-After takes no fractions), at least 1."""
        return str(max(1, math.ceil(wait)))


class RateLimitMiddleware:
    """The rate limit of every `/v1/` request, decided from the request line and headers alone, before
    the body is read or parsed (a refused client costs no JSON parsing and no body buffering).

    Three kinds of bucket, each with its own limit (serve.settings):
    - a valid API key: one bucket for the key (`api_key_rate_limit_*`), wherever it comes from,
      so a backend relaying all its users is not throttled as one anonymous address;
    - the webhooks: a bucket per webhook route and sender address (`webhook_rate_limit_*`);
    - anyone else (no key, a web session token, the admin token): a bucket per client address
      (`rate_limit_*`). The address is the connection's, or, from a proxy listed in
      `trusted_proxies` only, the one it names in X-Forwarded-For (uvicorn resolves it).
    The bucket's name is left in `scope["state"]["client_key"]` for per-client limits further in.
    """

    def __init__(self, app: ASGIApp, *, settings: Settings, metrics: Metrics):
        self.app = app
        self.metrics = metrics
        self.api_key = settings.api_key
        self.clients = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
        self.keys = RateLimiter(settings.api_key_rate_limit_per_minute, settings.api_key_rate_limit_burst)
        self.webhooks = RateLimiter(settings.webhook_rate_limit_per_minute, settings.webhook_rate_limit_burst)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        limiter, key, whom = self._bucket(scope)
        scope.setdefault("state", {})["client_key"] = key
        wait = limiter.check(key)
        if wait <= 0:
            await self.app(scope, receive, send)
            return
        self.metrics.rejected.labels(reason="rate_limit").inc()
        retry = RateLimiter.retry_after_header(wait)
        payload = json.dumps(error_body("rate_limited", f"too many requests {whom}; retry in {retry} s")).encode()
        await send({"type": "http.response.start", "status": 429, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
            (b"retry-after", retry.encode())]})
        await send({"type": "http.response.body", "body": payload})

    def _bucket(self, scope: Scope) -> tuple[RateLimiter, str, str]:
        address = (scope.get("client") or ("unknown",))[0]
        if scope["path"].startswith("/v1/webhooks/"):
            return self.webhooks, f"webhook:{scope['path']}:{address}", "to this webhook from this address"
        if self.api_key is not None and key_matches(_presented(scope), self.api_key):
            return self.keys, "api-key", "with this API key"
        return self.clients, f"client:{address}", "from this client"


def _presented(scope: Scope) -> str | None:
    """The credential of a request (as serve.protection.presented_key reads it), from the raw headers."""
    authorization = api_key = None
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"x-api-key":
            api_key = value.decode("latin-1")
    if authorization is not None:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    return api_key or None
