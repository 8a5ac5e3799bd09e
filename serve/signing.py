"""Webhook signatures: one recipe for Chatwoot deliveries, generic deliveries and our callbacks.

The recipe is Chatwoot's (4.x): `sha256=` + lowercase hex HMAC-SHA256(secret, "{timestamp}.{raw body}"),
sent with a unix-seconds timestamp header (new on every attempt, so a captured request cannot be
replayed after the tolerance) and a delivery id header (the same on every attempt, for dedupe).
Only the header names differ between schemes.

Verification works on the raw request bytes (never on re-serialised JSON), compares in constant
time, and returns an error value instead of raising; secrets never appear in messages.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

MAX_SKEW_S = 300
"""How far (seconds, either way) a delivery's timestamp may be from our clock."""

PREFIX = "sha256="


@dataclass(frozen=True)
class Scheme:
    """The header names one platform uses for the shared recipe."""

    signature: str
    timestamp: str
    delivery: str


CHATWOOT = Scheme("X-Chatwoot-Signature", "X-Chatwoot-Timestamp", "X-Chatwoot-Delivery")
SUPPORTBOT = Scheme("X-Supportbot-Signature", "X-Supportbot-Timestamp", "X-Supportbot-Delivery")


@dataclass(frozen=True)
class SignatureError:
    """Why a delivery was refused: `code` is stable (for clients), `message` is for people."""

    code: str
    message: str


def compute(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header value for `body` sent at `timestamp` (unix seconds, as sent)."""
    mac = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return PREFIX + mac.hexdigest()


def sign(secret: str, body: bytes, scheme: Scheme, *, delivery_id: str | None = None,
         now: float | None = None) -> dict[str, str]:
    """Headers that sign `body` under `scheme`: signature, a fresh timestamp, and the delivery id.

    Pass the same `delivery_id` on every retry of one delivery so the receiver can dedupe it.
    """
    timestamp = str(int(time.time() if now is None else now))
    return {
        scheme.signature: compute(secret, timestamp, body),
        scheme.timestamp: timestamp,
        scheme.delivery: delivery_id or str(uuid.uuid4()),
    }


def verify(secret: str, headers: Mapping[str, str], body: bytes, scheme: Scheme, *,
           now: float | None = None, max_skew_s: int = MAX_SKEW_S) -> SignatureError | None:
    """None when `body` carries a valid, fresh signature under `scheme`; else the reason.

    `headers` must look names up case-insensitively (Starlette's and httpx's headers do).
    """
    signature = headers.get(scheme.signature)
    timestamp = headers.get(scheme.timestamp)
    if not signature:
        return SignatureError("missing_signature", f"the {scheme.signature} header is required")
    if not timestamp:
        return SignatureError("missing_timestamp", f"the {scheme.timestamp} header is required")
    timestamp = timestamp.strip()
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        return SignatureError("bad_timestamp", f"{scheme.timestamp} must be unix seconds")
    expected = compute(secret, timestamp, body)
    if not hmac.compare_digest(expected.encode("ascii"), signature.strip().encode("utf-8", "replace")):
        return SignatureError("bad_signature", f"{scheme.signature} does not match the body and timestamp")
    skew = abs((time.time() if now is None else now) - int(timestamp))
    if skew > max_skew_s:
        return SignatureError(
            "stale_timestamp", f"{scheme.timestamp} is {int(skew)} s away from the server clock (limit {max_skew_s} s)"
        )
    return None
