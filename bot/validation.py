"""Input rules, each written once: what a session id is, what a customer message may hold, and
how a list of validation errors is told to a person.

Decision: these rules sit in bot/, the lowest layer, and every entry point (the Chatbot, the HTTP
routes, both webhooks, the CLI) calls them, so a rule cannot differ between channels. Before,
the session id had three definitions, the message length three limits (2,000, 4,000, 10,000)
and validation errors five formatters.

- A session id (and an id a platform gives us, such as a conversation id) is ASCII letters,
  digits and `_ . : @ -`, starting with a letter or digit, at most 128 characters. It appears in
  URLs (/v1/sessions/{id}), logs and database keys, so it is an identifier, not text: no spaces,
  no control characters, nothing that needs escaping. Platform ids are prefixed (`chatwoot:1:7`,
  `generic:<id>`), which is why `:` is allowed.
- A message is text of at most `MAX_MESSAGE_CHARS` characters (serving can lower or raise it
  with SUPPORTBOT_MAX_MESSAGE_CHARS; training data uses the same limit), valid Unicode (no lone
  surrogates), not blank, and without control characters other than tab, newline and carriage
  return: a NUL or an escape sequence is never what a customer typed, and stored as is it
  reaches transcripts, logs and agents' screens.
- Validation errors read `where: problem; where: problem`, at most 10, and never quote the
  rejected input (it may be a customer's text or a secret).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from .errors import SupportbotError

MAX_SESSION_ID_CHARS = 128
MAX_MESSAGE_CHARS = 2000
ALLOWED_CONTROL = "\t\n\r"
MAX_ERRORS_SHOWN = 10


def identifier_pattern(max_chars: int) -> str:
    """The JSON-Schema / pydantic pattern of an identifier of at most `max_chars` characters."""
    return rf"^[A-Za-z0-9][A-Za-z0-9_.:@-]{{0,{max_chars - 1}}}$"


SESSION_ID_PATTERN = identifier_pattern(MAX_SESSION_ID_CHARS)
_SESSION_ID = re.compile(SESSION_ID_PATTERN.removeprefix("^").removesuffix("$"))
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class InvalidSessionId(SupportbotError, ValueError):
    """A session id that breaks the rule above."""


class InvalidMessage(SupportbotError, ValueError):
    """A message that is not text, is blank or is not valid Unicode."""


class MessageTooLong(InvalidMessage):
    """A message over the length limit."""


class UnprintableMessage(InvalidMessage):
    """A message holding control characters other than tab, newline and carriage return."""


def check_session_id(session_id: object) -> str:
    """`session_id` when it follows the rule; InvalidSessionId (a one-line reason) otherwise."""
    if not isinstance(session_id, str) or not session_id.strip():
        raise InvalidSessionId("session_id must be a non-empty string")
    if len(session_id) > MAX_SESSION_ID_CHARS:
        raise InvalidSessionId(f"session_id is {len(session_id)} characters; the limit is {MAX_SESSION_ID_CHARS}")
    if not _SESSION_ID.fullmatch(session_id):
        raise InvalidSessionId("session_id may hold only ASCII letters, digits and _ . : @ - "
                               "and must start with a letter or digit")
    return session_id


def check_message(text: object, *, limit: int = MAX_MESSAGE_CHARS, name: str = "message") -> str:
    """`text` when a customer message may be `text`; an InvalidMessage naming `name` otherwise.

    The checks run in this order so the answer names the real problem: not text, too long, a
    lone surrogate, a control character, blank (a message of control characters is refused as
    such, not as blank)."""
    if not isinstance(text, str):
        raise InvalidMessage(f"{name} must be text")
    if len(text) > limit:
        raise MessageTooLong(f"{name} is {len(text):,} characters long; the limit is {limit:,}")
    if _SURROGATE.search(text):
        raise InvalidMessage(f"{name} is not valid Unicode text (lone surrogate)")
    if _CONTROL.search(text):
        raise UnprintableMessage(f"{name} holds control characters; only tab, newline and carriage return are allowed")
    if not text.strip():
        raise InvalidMessage(f"{name} is empty")
    return text


def describe_validation_errors(
    errors: ValidationError | Iterable[Mapping[str, Any]], *, renamed: Mapping[str, str] | None = None
) -> str:
    """`where: problem; ...` for pydantic errors (at most 10, then "(and N more)").

    `renamed` replaces pydantic's message for an error type (settings say "unknown setting" for
    `extra_forbidden`). A location's leading `body` (FastAPI's request body) is left out."""
    if isinstance(errors, ValidationError):
        errors = errors.errors(include_input=False, include_url=False)
    items = list(errors)
    parts = []
    for error in items[:MAX_ERRORS_SHOWN]:
        loc = [str(p) for p in error.get("loc", ())]
        if loc[:1] == ["body"]:
            loc = loc[1:]
        message = (renamed or {}).get(str(error.get("type")), error.get("msg", "invalid value"))
        parts.append(f"{'.'.join(loc) or 'body'}: {message}")
    more = f" (and {len(items) - MAX_ERRORS_SHOWN} more)" if len(items) > MAX_ERRORS_SHOWN else ""
    return "; ".join(parts) + more
