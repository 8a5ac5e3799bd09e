"""Who may use which conversation: each channel owns its sessions; the web page holds a signed session token.

The model (docs/security.md):

- Sessions are named by their channel. `chatwoot:{account}:{conversation}` and `generic:{id}` belong
  to their webhook and `web:{random}` to the web page; `CHANNEL_PREFIXES` lists them. The chat API
  refuses them (403 `session_forbidden`) to everyone, because Chatwoot's conversation ids are
  sequential: a guessed name must not let anyone read a transcript or silence the bot for a real
  customer. The admin token may read any transcript.
- An API-key caller (a server of the operator) has the chat API to itself in its own namespace:
  any session id it chooses, except the channel prefixes. Without an API key configured the
  server is open (development): anyone has that namespace, but transcripts are still never
  public (the API key, the admin token, or the session's own token).
- The web page gets a session token from `POST /v1/web/session`: `sbt1.{session id}.{expiry}.{signature}`,
  an HMAC-SHA256 over the session id and expiry with a server secret. The server chooses the
  session id. The token lets its holder chat in that session and read its transcript, and
  nothing else; it expires (`session_token_ttl_s`) and can be renewed while it is valid. So the
  page works with SUPPORTBOT_API_KEY set, and the key never reaches a browser.

The secret comes from SUPPORTBOT_SESSION_SECRET. Unset, one is generated at start: tokens then
stop working at a restart, and replicas behind one load balancer must share a set secret.
Secrets and tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fastapi import Request

from .errors import ApiError
from .protection import key_matches, presented_key
from .settings import Settings

log = logging.getLogger("supportbot.serve")

CHANNEL_PREFIXES = ("chatwoot:", "generic:", "web:")
WEB_PREFIX = "web:"
TOKEN_PREFIX = "sbt1."

CallerKind = Literal["api_key", "admin", "session", "anonymous"]


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the API key, the admin token, a web session token (and its session), or no one."""

    kind: CallerKind
    session_id: str | None = None


class SessionTokens:
    """Mints and verifies web session tokens (HMAC-SHA256 with the server's session secret)."""

    def __init__(self, secret: bytes, ttl_s: float, *, clock: Callable[[], float] = time.time):
        self._secret = secret
        self.ttl_s = ttl_s
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: Settings) -> SessionTokens:
        if settings.session_secret is not None:
            return cls(settings.session_secret.get_secret_value().encode("utf-8"), settings.session_token_ttl_s)
        log.warning("SUPPORTBOT_SESSION_SECRET is not set: web chat tokens are signed with a key made at start, so "
                    "they stop working at a restart and on other replicas; set one shared secret for all replicas")
        return cls(secrets.token_bytes(32), settings.session_token_ttl_s)

    def mint(self, session_id: str | None = None) -> tuple[str, str, int]:
        """(token, session id, expiry as Unix seconds); a new `web:` session unless one is given."""
        session_id = session_id or WEB_PREFIX + secrets.token_urlsafe(18)
        expires = int(self._clock() + self.ttl_s)
        return f"{TOKEN_PREFIX}{session_id}.{expires}.{self._sign(session_id, expires)}", session_id, expires

    def verify(self, token: str) -> str | None:
        """The session id a valid, unexpired token is bound to; None for anything else."""
        parts = token.removeprefix(TOKEN_PREFIX).split(".")
        if not token.startswith(TOKEN_PREFIX) or len(parts) != 3 or not parts[1].isdigit():
            return None
        session_id, expires, signature = parts[0], int(parts[1]), parts[2]
        if not hmac.compare_digest(signature.encode(), self._sign(session_id, expires).encode()):
            return None
        if expires <= self._clock() or not session_id.startswith(WEB_PREFIX):
            return None
        return session_id

    def _sign(self, session_id: str, expires: int) -> str:
        digest = hmac.new(self._secret, f"sbt1|{session_id}|{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def is_channel_session(session_id: str) -> bool:
    return session_id.startswith(CHANNEL_PREFIXES)


def identify(request: Request, settings: Settings, tokens: SessionTokens) -> Caller:
    """The caller of a request, from `Authorization: Bearer ...` or `X-API-Key`; 401 for a credential
    that is none of the server's (a wrong key, a bad or expired session token)."""
    presented = presented_key(request)
    if presented is None:
        return Caller("anonymous")
    if presented.startswith(TOKEN_PREFIX):
        session_id = tokens.verify(presented)
        if session_id is None:
            raise ApiError(401, "session_expired", "the session token is not valid or has expired; get a new one "
                                                   "from POST /v1/web/session", {"WWW-Authenticate": "Bearer"})
        return Caller("session", session_id)
    if settings.api_key is not None and key_matches(presented, settings.api_key):
        return Caller("api_key")
    if settings.admin_token is not None and key_matches(presented, settings.admin_token):
        return Caller("admin")
    if settings.api_key is None:
        return Caller("anonymous")  # an open server ignores keys it does not have
    raise ApiError(401, "unauthorized", "the API key is not valid", {"WWW-Authenticate": "Bearer"})


def _need_key() -> ApiError:
    return ApiError(401, "unauthorized", "this API needs a key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`",
                    {"WWW-Authenticate": "Bearer"})


def _channel_refused(session_id: str) -> ApiError:
    return ApiError(403, "session_forbidden", f"session ids starting with {', '.join(CHANNEL_PREFIXES)} belong to "
                                              f"their channel and cannot be used here ({session_id.split(':')[0]}:)")


def chat_session(caller: Caller, settings: Settings, session_id: str | None) -> str | None:
    """The session a chat message may go to (None: start a new one); 401/403 otherwise."""
    if caller.kind == "session":
        if session_id is not None and session_id != caller.session_id:
            raise ApiError(403, "session_forbidden", "this session token is for another conversation")
        return caller.session_id
    if caller.kind == "api_key" or (caller.kind == "anonymous" and settings.api_key is None):
        if session_id is not None and is_channel_session(session_id):
            raise _channel_refused(session_id)
        return session_id
    if caller.kind == "admin":
        raise ApiError(403, "forbidden", "the admin token reads transcripts; chat needs the API key")
    raise _need_key()


def check_classify(caller: Caller, settings: Settings) -> None:
    """Classify is for API-key callers (or anyone when no key is configured); not for session tokens."""
    if caller.kind == "api_key" or (caller.kind == "anonymous" and settings.api_key is None):
        return
    if caller.kind in ("session", "admin"):
        raise ApiError(403, "forbidden", "classify needs the API key")
    raise _need_key()


def check_transcript(caller: Caller, session_id: str) -> None:
    """Transcripts are never public: the admin token (any), the API key (its namespace), or the session's token."""
    if caller.kind == "admin":
        return
    if caller.kind == "session":
        if session_id != caller.session_id:
            raise ApiError(403, "session_forbidden", "this session token is for another conversation")
        return
    if caller.kind == "api_key":
        if is_channel_session(session_id):
            raise _channel_refused(session_id)
        return
    raise ApiError(401, "unauthorized", "transcripts need the API key, the admin token, or the session's own token "
                                        "(`Authorization: Bearer ...`)", {"WWW-Authenticate": "Bearer"})
