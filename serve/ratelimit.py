"""Per-client rate limit: a token bucket per client address, in memory, bounded in size."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


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
