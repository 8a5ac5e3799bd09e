"""One error shape for every route: `{"error": {"code": ..., "message": ...}}`.

Domain errors (a bad message, a bad session id, no model loaded, overload, ...) are raised
where they happen, in bot/ and the serving runtime, and know nothing of HTTP. `ERRORS` below
is the one table that turns each of them into a status and a stable code; nothing else maps
them. Routes raise `ApiError` only for what is HTTP's own (a bad signature, a missing header).
`install_error_handlers` renders both, FastAPI's validation errors and Starlette's 404/405;
`LastResortMiddleware` answers any unexpected exception in that shape. Bad input is always a
4xx: a 500 means a bug, and its log line never carries message text.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from bot.errors import SupportbotError
from bot.sessions import SessionConflict
from bot.validation import (
    InvalidMessage,
    InvalidSessionId,
    MessageTooLong,
    UnprintableMessage,
    describe_validation_errors,
)

from .database import DatabaseUnavailable
from .runtime_errors import (
    NothingToReload,
    NotReady,
    Overloaded,
    ReloadFailed,
    ReloadInProgress,
    ServingError,
    SessionNotFound,
    ShuttingDown,
)

log = logging.getLogger("supportbot.serve")

STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}


_NOT_AN_OBJECT = {"model_attributes_type", "dict_type", "model_type"}


class ApiError(SupportbotError):
    """An error answered to the client: HTTP status, a stable machine code, a human message."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class ErrorRule:
    """How one domain error is answered over HTTP.

    `message` replaces the error's own text when that is not for clients (a SessionConflict names
    revisions). A `transient` refusal (retry later, with `retry_after` seconds) answers 503 on the
    API; a route that marks itself with `transient_status` (the webhooks: Chatwoot retries a
    delivery only on 429) answers that status instead."""

    status: int
    code: str
    message: str | None = None
    transient: bool = False
    retry_after: int = 1


# The one table from domain errors to HTTP. A subclass not listed answers like its nearest listed
# base (the lookup walks the class's MRO), so the order of the entries does not matter.
ERRORS: dict[type[Exception], ErrorRule] = {
    InvalidMessage: ErrorRule(422, "invalid_request"),
    MessageTooLong: ErrorRule(422, "message_too_long"),
    UnprintableMessage: ErrorRule(422, "invalid_message"),
    InvalidSessionId: ErrorRule(422, "invalid_request"),
    SessionConflict: ErrorRule(503, "session_busy", "this conversation is busy with another message; retry",
                               transient=True),
    NotReady: ErrorRule(503, "not_ready", transient=True),
    Overloaded: ErrorRule(503, "overloaded", transient=True),
    ShuttingDown: ErrorRule(503, "shutting_down", transient=True),
    SessionNotFound: ErrorRule(404, "session_not_found"),
    ReloadInProgress: ErrorRule(409, "reload_in_progress"),
    ReloadFailed: ErrorRule(422, "bundle_error"),
    NothingToReload: ErrorRule(422, "invalid_request"),
    DatabaseUnavailable: ErrorRule(503, "database_unavailable", transient=True, retry_after=2),
}


def rule_for(exc: BaseException) -> ErrorRule | None:
    """The table's rule for `exc`: its own class's, else its nearest listed base class's."""
    for cls in type(exc).__mro__:
        rule = ERRORS.get(cls)
        if rule is not None:
            return rule
    return None


def as_api_error(exc: Exception, *, transient_status: int | None = None) -> ApiError:
    """The domain error `exc` as the table answers it (a 500 for one not in the table).

    `transient_status` is the status a transient refusal gets on this route (default: the table's)."""
    rule = rule_for(exc)
    if rule is None:
        return ApiError(500, "internal_error", "the server failed to handle this request; it has been logged")
    status = transient_status if rule.transient and transient_status is not None else rule.status
    headers = {}
    if rule.transient:
        retry_after = exc.retry_after if isinstance(exc, ServingError) and exc.retry_after else rule.retry_after
        headers["Retry-After"] = str(retry_after)
    return ApiError(status, rule.code, rule.message or str(exc), headers)


def answer_transient_with(status: int) -> Callable[[Request], Awaitable[None]]:
    """A route dependency: transient refusals on this route answer `status` (with Retry-After)."""

    async def mark(request: Request) -> None:
        request.state.transient_status = status

    return mark


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=dict(headers or {}))


def request_error(errors: list[dict[str, Any]]) -> tuple[int, str, str]:
    """(status, code, message) for a request FastAPI could not validate; never echoes the rejected input."""
    if any(error.get("type") == "json_invalid" for error in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return 400, "invalid_json", f"the request body is not valid JSON{': ' + str(detail) if detail else ''}"
    if any(tuple(error.get("loc", ())) == ("body",) and error.get("type") in _NOT_AN_OBJECT for error in errors):
        return 422, "invalid_request", "the request body must be a JSON object (Content-Type: application/json)"
    return 422, "invalid_request", describe_validation_errors(errors)


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    return await _api_error(request, as_api_error(exc, transient_status=getattr(request.state, "transient_status", None)))


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    status, code, message = request_error(list(exc.errors()))
    return error_response(status, code, message)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = STATUS_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    if exc.status_code == 400:  # FastAPI's answer to a body it cannot decode (not UTF-8)
        code, message = "invalid_json", "the request body could not be read as JSON (it must be UTF-8)"
    elif exc.status_code == 404:
        message = "no such route; see /docs for the API"
    elif exc.status_code == 405:
        message = f"this route does not accept {_request.method}; see /docs for the API"
    return error_response(exc.status_code, code, message, exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    for domain_error in ERRORS:
        app.add_exception_handler(domain_error, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


class LastResortMiddleware:
    """Turns an unexpected exception into a logged 500 in the error shape, and stops it there.

    Starlette's own last handler re-raises to the server, which logs the exception's message
    (it may quote a customer). This logs the frames and the type only.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            return  # the client went away mid-request: nothing to answer, not a server error
        except Exception as exc:
            frames = "".join(traceback.format_tb(exc.__traceback__))
            log.error("unhandled %s on %s %s\n%s", type(exc).__name__, scope["method"], scope["path"], frames)
            if started:  # too late for a clean answer: drop the connection
                raise
            response = error_response(500, "internal_error", "the server failed to handle this request; it has been logged")
            await response(scope, receive, send)
