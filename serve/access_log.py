"""Structured JSON logs: one access line per request, and the process's other log lines as JSON.

Customer text stays out of the logs unless `log_message_text` is set: routes add what is safe
to log (session id, intent, action, model version) to `request.state.log`, and put the
message under the key "message_text", which is dropped unless the setting allows it.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import Metrics

access_log = logging.getLogger("supportbot.access")

REQUEST_ID_HEADER = b"x-request-id"
# The methods counted under their own name; anything else is "other", so invented methods
# cannot grow /metrics without bound.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
# nginx's "client closed request": the client went away before any answer was sent.
CLIENT_CLOSED = 499
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "msg", ...extra fields}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")})
        if record.exc_info and record.exc_info[0] is not None:
            line["exc_type"] = record.exc_info[0].__name__
        return json.dumps(line, default=str, ensure_ascii=False)


def logging_config(level: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` for uvicorn's `log_config`: everything as JSON on stderr."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"json": handler},
        "loggers": {
            "supportbot": {"handlers": ["json"], "level": level.upper(), "propagate": False},
            "uvicorn": {"handlers": ["json"], "level": level.upper(), "propagate": False},
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }


class AccessLogMiddleware:
    """Times every HTTP request, counts it in the metrics and writes one JSON access line."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, enabled: bool, include_text: bool):
        self.app = app
        self.metrics = metrics
        self.enabled = enabled
        self.include_text = include_text

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        status: int | None = None

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER, request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            elapsed = time.perf_counter() - started
            route = _route_template(scope)
            # No answer at all: the client disconnected first (errors are answered by LastResortMiddleware).
            answered = CLIENT_CLOSED if status is None else status
            self.metrics.requests.labels(method=method_label(scope["method"]), route=route,
                                         status=str(answered)).inc()
            self.metrics.request_latency.labels(route=route).observe(elapsed)
            if self.enabled:
                self._log(scope, route, answered, elapsed, request_id)

    def _log(self, scope: Scope, route: str, status: int, elapsed: float, request_id: str) -> None:
        fields: dict[str, Any] = {
            "method": scope["method"][:16],
            "path": scope["path"],
            "route": route,
            "status": status,
            "ms": round(elapsed * 1000, 2),
            "client": (scope.get("client") or ("-",))[0],
            "request_id": request_id,
        }
        extra = dict((scope.get("state") or {}).get("log") or {})
        if not self.include_text:
            extra.pop("message_text", None)
        fields.update(extra)
        access_log.info("%s %s %d", scope["method"], scope["path"], status, extra=fields)


def method_label(method: str) -> str:
    """The metrics label of an HTTP method: the method when it is a standard one, else "other"."""
    return method if method in KNOWN_METHODS else "other"


def _route_template(scope: Scope) -> str:
    """The matched route's path template (bounded label values), not the raw path."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def _request_id(scope: Scope) -> str:
    """The caller's X-Request-ID when it is short and printable, else a new one."""
    for name, value in scope.get("headers") or ():
        if name == REQUEST_ID_HEADER and 0 < len(value) <= 64 and value.isascii() and value.decode().isprintable():
            return value.decode()
    return uuid.uuid4().hex
