"""Why the serving runtime refuses a request: domain errors, without HTTP.

The runtime (serve/runtime.py) and the webhook machinery raise these; serve/errors.py maps
each, with bot's own errors (a bad message, a bad session id, a busy session), to an HTTP status
and code in one table. Decision: the runtime is used by routes, webhooks and tests alike, and
what a refusal means over HTTP (503 for the chat API, 429 for a platform that retries only on
429) is the HTTP edge's business, not the runtime's.

`retry_after` (seconds), when set on an instance, overrides the table's Retry-After.
"""

from __future__ import annotations

from bot.errors import SupportbotError


class ServingError(SupportbotError):
    """A request the server cannot serve now or at all; `str()` is one line for the client."""

    def __init__(self, message: str, *, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class NotReady(ServingError):
    """No model is loaded yet (or loading failed), or the webhook outbox is still starting."""


class Overloaded(ServingError):
    """The model's queue is full."""


class ShuttingDown(ServingError):
    """The server is stopping and takes no new work."""


class SessionNotFound(ServingError):
    """No conversation has this session id."""


class ReloadInProgress(ServingError):
    """Another reload is running."""


class ReloadFailed(ServingError):
    """The bundle to reload could not be loaded; the old one keeps serving."""


class NothingToReload(ServingError):
    """A reload without a bundle, on a server that was started without one."""
