"""Chatwoot as an Agent Bot platform: the events it POSTs to us, and its REST API we answer through.

Built to Chatwoot 4.x. Event bodies are a message's or a conversation's webhook data plus `event`;
unknown events and unknown fields are ignored, so newer Chatwoot versions keep working.
The API client knows three calls: post a public reply, open a conversation to humans
(`toggle_status` to `open`), which is how an Agent Bot hands off, and list a conversation's latest
messages, which the outbox uses before re-sending a reply whose earlier send may have arrived
(a timeout after the request went out, or a replica that died mid-send): a slow Chatwoot that
answered after our timeout already has the reply, and posting it again would show it twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bot.validation import describe_validation_errors

from .outbox import Action, Checker, NewAction, Sender

KIND_MESSAGE = "chatwoot.message"
KIND_OPEN = "chatwoot.open"

MESSAGE_EVENTS = {"message_created", "message_updated"}
CONVERSATION_EVENTS = {"conversation_opened", "conversation_resolved", "conversation_status_changed",
                       "conversation_updated"}

# Older Chatwoot versions and some integrations send enum integers instead of names.
_MESSAGE_TYPES = {0: "incoming", 1: "outgoing", 2: "activity", 3: "template"}
_CONVERSATION_STATUSES = {0: "open", 1: "resolved", 2: "pending", 3: "snoozed"}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Account(_Lenient):
    id: int


class Conversation(_Lenient):
    id: int = Field(..., description="the display id, as used in API routes")
    status: str | None = None
    account_id: int | None = None
    messages: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("status", mode="before")
    @classmethod
    def _status_name(cls, value: Any) -> Any:
        return _CONVERSATION_STATUSES.get(value, value) if isinstance(value, int) else value


class MessageEvent(_Lenient):
    """`message_created` / `message_updated`: a message's webhook data plus `event`."""

    event: str
    id: int
    content: str | None = None
    message_type: str
    private: bool = False
    account: Account
    conversation: Conversation

    @field_validator("message_type", mode="before")
    @classmethod
    def _type_name(cls, value: Any) -> Any:
        return _MESSAGE_TYPES.get(value, value) if isinstance(value, int) else value

    @property
    def should_answer(self) -> bool:
        """A customer's public text in a conversation the bot owns (`pending`); everything else is
        the bot's own echo, an agent's reply, a private note, or a conversation a human handles."""
        return (
            self.event == "message_created"
            and self.message_type == "incoming"
            and not self.private
            and bool((self.content or "").strip())
            and self.conversation.status == "pending"
        )


class ConversationEvent(_Lenient):
    """`conversation_*`: a conversation's webhook data plus `event` (and `changed_attributes`)."""

    event: str
    id: int
    status: str | None = None
    account_id: int | None = None
    account: Account | None = None
    messages: list[dict[str, Any]] = Field(default_factory=list)
    changed_attributes: list[dict[str, Any]] | None = None

    @field_validator("status", mode="before")
    @classmethod
    def _status_name(cls, value: Any) -> Any:
        return _CONVERSATION_STATUSES.get(value, value) if isinstance(value, int) else value

    @property
    def account_ref(self) -> int | None:
        """The account id: a top-level field where Chatwoot sends one, else the last message's."""
        if self.account_id is not None:
            return self.account_id
        if self.account is not None:
            return self.account.id
        for message in self.messages:
            if isinstance(message.get("account_id"), int):
                return message["account_id"]
        return None

    @property
    def status_change(self) -> tuple[str | None, str | None] | None:
        """(previous, current) status when `changed_attributes` records a status change."""
        for change in self.changed_attributes or []:
            status = change.get("status") if isinstance(change, dict) else None
            if isinstance(status, dict):
                return status.get("previous_value"), status.get("current_value")
        return None


@dataclass(frozen=True)
class Ignored:
    """An event we acknowledge and do nothing with; `reason` goes into the response and debug logs."""

    reason: str


@dataclass(frozen=True)
class Invalid:
    """A body that claims a known event but lacks what that event must carry."""

    message: str


ConversationCommand = Literal["handoff", "release", "reset"]
# What a conversation_status_changed event's new status asks of the bot (other statuses: nothing).
STATUS_COMMANDS: Mapping[str, ConversationCommand] = {"open": "handoff", "pending": "release", "resolved": "reset"}


@dataclass(frozen=True)
class ConversationChange:
    """What a conversation event means for the bot: a human took over, gave it back, or it ended."""

    account_id: int
    conversation_id: int
    command: ConversationCommand


def parse_event(body: Any) -> MessageEvent | ConversationChange | Ignored | Invalid:
    """Turn a delivery's JSON into the one thing the bot should do about it."""
    if not isinstance(body, dict):
        return Invalid("the body must be a JSON object")
    event = body.get("event")
    if not isinstance(event, str):
        return Invalid("the body has no `event`")
    try:
        if event in MESSAGE_EVENTS:
            return MessageEvent.model_validate(body)
        if event in CONVERSATION_EVENTS:
            return _conversation_change(ConversationEvent.model_validate(body))
    except ValidationError as exc:
        return Invalid(f"{event}: " + describe_validation_errors(exc))
    return Ignored(f"event {event!r} is not handled")


def _conversation_change(event: ConversationEvent) -> ConversationChange | Ignored | Invalid:
    command = _command_for(event)
    if command is None:
        return Ignored(f"{event.event} to status {event.status!r} needs nothing from the bot")
    account = event.account_ref
    if account is None:
        return Invalid(f"{event.event}: no account id (account_id, account.id or messages[].account_id)")
    return ConversationChange(account, event.id, command)


def _command_for(event: ConversationEvent) -> ConversationCommand | None:
    if event.event == "conversation_resolved":
        return "reset"
    if event.event == "conversation_opened":
        return "handoff"
    if event.event == "conversation_status_changed":
        change = event.status_change
        current = change[1] if change else event.status
        return STATUS_COMMANDS.get(current or "")
    return None  # conversation_updated: assignments, labels, ...; status changes come as their own events


def session_id(account_id: int, conversation_id: int) -> str:
    """The bot session of a Chatwoot conversation (display ids are unique per account only)."""
    return f"chatwoot:{account_id}:{conversation_id}"


def message_payload(account_id: int, conversation_id: int, content: str) -> dict[str, Any]:
    return {"account_id": account_id, "conversation_id": conversation_id, "content": content}


def open_payload(account_id: int, conversation_id: int) -> dict[str, Any]:
    return {"account_id": account_id, "conversation_id": conversation_id}


@dataclass
class ChatwootClient:
    """Chatwoot's application API with an Agent Bot's access token (kept out of reprs and logs)."""

    base_url: str
    token: str = field(repr=False)
    http: httpx.AsyncClient = field(repr=False)

    def _url(self, account_id: int, conversation_id: int, tail: str) -> str:
        return f"{self.base_url.rstrip('/')}/api/v1/accounts/{account_id}/conversations/{conversation_id}/{tail}"

    async def send_message(self, account_id: int, conversation_id: int, content: str) -> httpx.Response:
        """Post a public reply as the bot. 200 on success; 401 wrong token; 404 unknown conversation."""
        return await self.http.post(
            self._url(account_id, conversation_id, "messages"),
            json={"content": content, "message_type": "outgoing", "private": False},
            headers={"api_access_token": self.token},
        )

    async def open_conversation(self, account_id: int, conversation_id: int) -> httpx.Response:
        """Hand the conversation to human agents (pending -> open)."""
        return await self.http.post(
            self._url(account_id, conversation_id, "toggle_status"),
            json={"status": "open"},
            headers={"api_access_token": self.token},
        )

    async def latest_messages(self, account_id: int, conversation_id: int) -> httpx.Response:
        """The conversation's latest messages (Chatwoot returns the last 20, oldest first, in `payload`)."""
        return await self.http.get(self._url(account_id, conversation_id, "messages"),
                                   headers={"api_access_token": self.token})

    async def find_reply(self, action: Action, after: str | None) -> str | None:
        """The id of an outgoing message with this action's text that Chatwoot created for it, or None.

        `after` is the receipt (message id) of the conversation's previous delivered reply: Chatwoot's
        ids only grow, so a match created after it is this action's, even when the bot said the same
        thing twice in a row. Without one (the conversation's first reply), a match must be created no
        earlier than the second of the first attempt (Chatwoot's `created_at` is in whole seconds).
        Raises httpx errors (the outbox retries) and treats an unreadable answer as "not there"."""
        p = action.payload
        response = await self.latest_messages(int(p["account_id"]), int(p["conversation_id"]))
        if response.status_code != 200:
            raise httpx.HTTPStatusError("listing messages failed", request=response.request, response=response)
        try:
            messages = response.json().get("payload") or []
        except (ValueError, AttributeError):
            return None
        floor = _message_id(after)
        since = int(action.first_attempt_at or action.created_at)
        for message in messages:
            if not isinstance(message, dict):
                continue
            if (message.get("message_type") not in (1, "outgoing") or message.get("private")
                    or message.get("content") != p["content"]):
                continue
            number = _message_id(message.get("id"))
            created = message.get("created_at")
            if floor is not None:
                if number is not None and number > floor:
                    return str(number)
            elif isinstance(created, int | float) and created >= since:
                return "" if number is None else str(number)
        return None

    def checkers(self) -> dict[str, Checker]:
        """Before re-sending an uncertain reply: is it in the conversation already?"""

        async def find_message(action: Action, after: str | None) -> str | None:
            try:
                return await self.find_reply(action, after)
            except httpx.HTTPStatusError as exc:  # cannot tell: send (a double beats a lost reply)
                if exc.response.status_code in (429,) or exc.response.status_code >= 500:
                    raise httpx.TransportError("listing messages failed") from None
                return None

        def message_receipt(response: httpx.Response) -> str | None:
            answer = response.json()
            number = _message_id(answer.get("id")) if isinstance(answer, dict) else None
            return None if number is None else str(number)

        return {KIND_MESSAGE: Checker(find=find_message, receipt=message_receipt)}

    def senders(self) -> dict[str, Sender]:
        """The outbox senders for Chatwoot actions."""

        async def send_message(action: Action) -> httpx.Response:
            p = action.payload
            return await self.send_message(int(p["account_id"]), int(p["conversation_id"]), str(p["content"]))

        async def open_conversation(action: Action) -> httpx.Response:
            p = action.payload
            return await self.open_conversation(int(p["account_id"]), int(p["conversation_id"]))

        return {KIND_MESSAGE: send_message, KIND_OPEN: open_conversation}


def _message_id(value: Any) -> int | None:
    """A Chatwoot message id (an integer, or its text), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def handoff_after(action: Action) -> list[NewAction]:
    """When a reply cannot be delivered for good, open the conversation to human agents, ahead of
    anything else queued for it, so no customer waits on a bot that gave up."""
    if action.kind != KIND_MESSAGE:
        return []
    p = action.payload
    return [NewAction(action.conversation, KIND_OPEN, open_payload(int(p["account_id"]), int(p["conversation_id"])),
                      priority=1)]
