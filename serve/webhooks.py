"""Support-platform webhooks: Chatwoot's Agent Bot events and a generic signed webhook.

Both routes work the same way, within a few milliseconds and before answering the platform:
verify the signature over the raw body; drop a delivery seen before (by delivery id and by
message id, remembered in SQLite); get the reply from the same Chatbot as the chat API (the turn
is committed with the message id as its idempotency key, so a retry after a crash between the two
commits replays it rather than answering twice); commit the dedupe keys and the actions to send (reply, handoff, callback) to the durable outbox in one
transaction; answer 2xx. The outbox worker sends afterwards, with retries, in order per
conversation. A per-conversation lock spans "reply + commit", so the outbox order is the order
in which the bot wrote the replies; with PostgreSQL it holds across replicas (an advisory lock,
serve/postgres.py), so a delivery repeated to another replica waits and is found a duplicate.
While the database does not answer, deliveries get 429 (nothing is acknowledged that is not stored).

Chatwoot retries a delivery only on 429 and 500 and, when a delivery fails for good, opens the
conversation to human agents. So transient conditions here (model loading, overload, a busy
session) answer 429 with Retry-After: Chatwoot tries again, and if it keeps failing a human
takes over, which is the right outcome. Permanent problems (a bad signature, a malformed body)
answer 4xx.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, overload
from urllib.parse import urlsplit

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from bot.chatbot import Reply
from bot.sessions import SessionConflict
from bot.validation import UnprintableMessage, check_message, describe_validation_errors, identifier_pattern

from . import chatwoot, signing
from .callbacks import CallbackPolicy, CallbackRefused, callback_client
from .chatwoot import ChatwootClient, ConversationChange, Ignored, Invalid, MessageEvent
from .database import DatabaseUnavailable
from .errors import ApiError, answer_transient_with
from .outbox import (
    Action,
    Checker,
    Duplicate,
    NewAction,
    Outbox,
    OutboxMetrics,
    OutboxStore,
    RetryPolicy,
    Sender,
    Store,
)
from .routes import check_metadata, log_fields
from .runtime import Runtime
from .runtime_errors import NotReady
from .schemas import ChatResponse
from .settings import Settings

log = logging.getLogger("supportbot.webhooks")

OUTBOX_FILE = "outbox.sqlite3"
KIND_CALLBACK = "generic.callback"
ID_PATTERN = identifier_pattern(100)  # a platform id; prefixed ("generic:"), it is a session id
MAX_DELIVERY_ID = 200


def _secret(value: Any) -> str | None:
    """A configured secret as text (settings hold SecretStr); None when unset or blank."""
    if value is None:
        return None
    text = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
    return text or None


@dataclass
class Webhooks:
    """The webhook side of one app: outbox, HTTP clients, Chatwoot client, callback policy, delivery metrics.

    Callbacks have a client of their own (`callback_http`, guarded against internal addresses);
    Chatwoot's URL is the operator's, often on a private network, so it uses the plain `http`."""

    runtime: Runtime
    outbox: Outbox | None = None
    http: httpx.AsyncClient | None = None
    callback_http: httpx.AsyncClient | None = None
    chatwoot: ChatwootClient | None = None
    deliveries: Counter | None = None
    callback_policy: CallbackPolicy = field(init=False)

    def __post_init__(self) -> None:
        self.callback_policy = CallbackPolicy(self.settings.callback_hosts)

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    async def start(self, _runtime: Runtime | None = None) -> None:
        s = self.settings
        self.http = httpx.AsyncClient(timeout=s.outbox_send_timeout_s, follow_redirects=False,
                                      headers={"User-Agent": "supportbot-webhooks"})
        self.callback_http = callback_client(self.callback_policy, s.outbox_send_timeout_s)
        chatwoot_url, chatwoot_token = s.chatwoot_url, _secret(s.chatwoot_token)
        if chatwoot_url and chatwoot_token:
            self.chatwoot = ChatwootClient(chatwoot_url, chatwoot_token, self.http)
            if _secret(s.chatwoot_secret) is None:
                log.warning("SUPPORTBOT_CHATWOOT_SECRET is not set: Chatwoot deliveries are accepted unsigned; "
                            "set the Agent Bot's secret in Chatwoot and here")
        else:
            log.info("Chatwoot webhook off: SUPPORTBOT_CHATWOOT_URL and SUPPORTBOT_CHATWOOT_TOKEN are not both set")
        if _secret(s.webhook_secret) is None:
            log.info("generic webhook off: SUPPORTBOT_WEBHOOK_SECRET is not set (it refuses deliveries with 503)")
        store: Store
        if self.runtime.engine is not None:
            from .postgres import PostgresOutboxStore

            store = PostgresOutboxStore(self.runtime.engine, lease_s=s.outbox_lease_s, max_locks=s.database_pool_size)
        else:
            store = await asyncio.to_thread(OutboxStore, s.data_dir / OUTBOX_FILE, lease_s=s.outbox_lease_s)
        checkers: dict[str, Checker] = {}
        senders: dict[str, Sender] = {KIND_CALLBACK: self._send_callback}
        if self.chatwoot is not None:
            senders.update(self.chatwoot.senders())
            checkers.update(self.chatwoot.checkers())
        else:  # actions queued under an earlier configuration fail with a clear reason
            senders.update({kind: _chatwoot_off for kind in (chatwoot.KIND_MESSAGE, chatwoot.KIND_OPEN)})
        policy = RetryPolicy(max_attempts=s.outbox_max_attempts, backoff_base_s=s.outbox_backoff_base_s,
                             backoff_cap_s=s.outbox_backoff_cap_s, horizon_s=s.outbox_retry_horizon_s)
        metrics = OutboxMetrics(self.runtime.metrics.registry, store)
        self.outbox = Outbox(store, senders, policy, metrics, concurrency=s.outbox_concurrency,
                             retention_s=s.outbox_retention_s, checkers=checkers, handoff=chatwoot.handoff_after,
                             uncertain_delay_s=s.outbox_send_timeout_s)
        self.outbox.start()

    async def stop(self, _runtime: Runtime | None = None) -> None:
        if self.outbox is not None:
            await self.outbox.stop(grace_s=min(5.0, self.settings.outbox_send_timeout_s))
            self.outbox.store.close()
        for client in (self.http, self.callback_http):
            if client is not None:
                await client.aclose()

    def count(self, platform: str, outcome: str) -> None:
        if self.deliveries is not None:
            self.deliveries.labels(platform=platform, outcome=outcome).inc()

    def require_outbox(self) -> Outbox:
        if self.outbox is None:
            raise NotReady("the webhook outbox is starting; retry", retry_after=3)
        return self.outbox

    async def _send_callback(self, action: Action) -> httpx.Response:
        """POST a reply to a generic platform's callback_url, signed afresh on every attempt.

        The host is checked again here (the allow-list may have changed since the action was
        queued), and the guarded client resolves it and refuses a non-public address as it
        connects. A refusal is raised as CallbackRefused, which the outbox records as a permanent
        failure; the log names the host, not the URL (it may carry a token)."""
        secret = _secret(self.settings.webhook_secret)
        if secret is None:
            raise RuntimeError("SUPPORTBOT_WEBHOOK_SECRET was unset after the callback was queued")
        assert self.callback_http is not None
        url = action.payload["url"]
        body = json.dumps(action.payload["body"], separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        headers = signing.sign(secret, body, signing.SUPPORTBOT, delivery_id=action.payload["delivery_id"])
        headers["Content-Type"] = "application/json"
        try:
            self.callback_policy.check_url(url)
            return await self.callback_http.post(url, content=body, headers=headers)
        except CallbackRefused as exc:
            log.warning("outbox action %s (%s): callback refused at send time: %s", action.id, action.conversation, exc)
            raise


async def _chatwoot_off(_action: Action) -> httpx.Response:
    raise RuntimeError("Chatwoot is not configured (SUPPORTBOT_CHATWOOT_URL / SUPPORTBOT_CHATWOOT_TOKEN)")


def install_webhooks(app: FastAPI, runtime: Runtime) -> Webhooks:
    """Add the webhook routes to `app` and run their outbox worker with the runtime."""
    webhooks = Webhooks(runtime)
    webhooks.deliveries = Counter("supportbot_webhook_deliveries", "webhook deliveries by platform and outcome",
                                  ["platform", "outcome"], registry=runtime.metrics.registry)
    runtime.on_startup(webhooks.start)
    runtime.on_shutdown(webhooks.stop)
    app.state.webhooks = webhooks
    app.include_router(build_webhook_router())
    return webhooks


def _webhooks(request: Request) -> Webhooks:
    return request.app.state.webhooks


# ----------------------------------------------------------------------------- shared steps


def _verify(webhooks: Webhooks, route: str, secret: str, request: Request, raw: bytes, scheme: signing.Scheme) -> None:
    """401 (counted as rejected for `route`) unless the delivery is signed with `secret`."""
    error = signing.verify(secret, request.headers, raw, scheme)
    if error is not None:
        webhooks.count(route, "rejected")
        raise ApiError(401, error.code, error.message)


def _require_json(request: Request) -> None:
    """415 unless the body is declared as JSON. A browser may post `text/plain` to any site without
    asking first (no CORS preflight); a JSON content type it may not, so this also shuts out
    cross-site form posts."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not (media_type.startswith("application/") and media_type.endswith("+json")):
        raise ApiError(415, "unsupported_media_type", "send the body as JSON with `Content-Type: application/json`")


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # "[[[[..." nested deeper than the parser's stack
        raise ApiError(400, "invalid_json", "the request body is not valid JSON: nested too deeply") from None


@overload
def _delivery_id(request: Request, scheme: signing.Scheme, *, required: Literal[True]) -> str: ...
@overload
def _delivery_id(request: Request, scheme: signing.Scheme, *, required: Literal[False]) -> str | None: ...
def _delivery_id(request: Request, scheme: signing.Scheme, *, required: bool) -> str | None:
    """The delivery id header, checked; a required one that is missing answers 400 (so it is never None)."""
    value = (request.headers.get(scheme.delivery) or "").strip()
    if not value:
        if required:
            raise ApiError(400, "missing_delivery_id", f"the {scheme.delivery} header is required")
        return None
    if len(value) > MAX_DELIVERY_ID or not value.isprintable():
        raise ApiError(400, "invalid_delivery_id", f"{scheme.delivery} must be printable and at most "
                                                   f"{MAX_DELIVERY_ID} characters")
    return value


@asynccontextmanager
async def _conversation(webhooks: Webhooks, outbox: Outbox, session: str) -> AsyncIterator[None]:
    """The conversation's lock across the fleet for "reply + commit"; a database outage or a lock
    that stays busy answers 429, so the platform delivers again later (nothing was acknowledged)."""
    try:
        async with outbox.conversation(session):
            yield
    except DatabaseUnavailable as exc:
        raise webhooks.runtime.database_down(exc) from None
    except TimeoutError:
        raise SessionConflict(f"the lock of conversation {session} stayed busy") from None


async def _apply(runtime: Runtime, command: str, session_id: str) -> None:
    """handoff / release / reset on the current chatbot (read at use time: reloads swap it)."""
    chatbot = runtime.chatbot
    await asyncio.to_thread(getattr(chatbot, command), session_id)


# ----------------------------------------------------------------------------- Chatwoot


async def handle_chatwoot(request: Request) -> JSONResponse:
    webhooks = _webhooks(request)
    _require_json(request)
    raw = await request.body()
    secret = _secret(webhooks.settings.chatwoot_secret)
    if secret is not None:
        _verify(webhooks, "chatwoot", secret, request, raw, signing.CHATWOOT)
    delivery = _delivery_id(request, signing.CHATWOOT, required=False)
    event = chatwoot.parse_event(_json(raw))
    log_fields(request, webhook="chatwoot", event=getattr(event, "event", None), delivery_id=delivery)
    if isinstance(event, Invalid):
        webhooks.count("chatwoot", "invalid")
        raise ApiError(422, "invalid_event", event.message)
    if isinstance(event, Ignored):
        webhooks.count("chatwoot", "ignored")
        return JSONResponse({"status": "ignored", "reason": event.reason})
    if isinstance(event, MessageEvent) and not event.should_answer:
        webhooks.count("chatwoot", "ignored")
        return JSONResponse({"status": "ignored", "reason": _why_not(event)})
    if webhooks.chatwoot is None:
        webhooks.count("chatwoot", "unconfigured")
        raise ApiError(503, "chatwoot_not_configured",
                       "set SUPPORTBOT_CHATWOOT_URL and SUPPORTBOT_CHATWOOT_TOKEN to answer Chatwoot")
    delivery_keys = [f"chatwoot:delivery:{delivery}"] if delivery else []
    if isinstance(event, ConversationChange):
        return await _chatwoot_conversation(webhooks, event, delivery_keys)
    return await _chatwoot_message(request, webhooks, event, delivery_keys)


async def _chatwoot_message(request: Request, webhooks: Webhooks, event: MessageEvent,
                            delivery_keys: list[str]) -> JSONResponse:
    account, conversation = event.account.id, event.conversation.id
    session = chatwoot.session_id(account, conversation)
    keys = [*delivery_keys, f"chatwoot:message:{account}:{event.id}"]
    text = event.content or ""
    try:
        check_message(text, limit=webhooks.settings.max_message_chars, name="content")
    except UnprintableMessage:
        return await _chatwoot_unprintable(webhooks, session, account, conversation, keys)
    outbox = webhooks.require_outbox()
    log_fields(request, session_id=session, message_text=text)
    async with _conversation(webhooks, outbox, session):
        if await outbox.seen(keys) is not None:
            webhooks.count("chatwoot", "duplicate")
            return JSONResponse({"status": "duplicate"})
        metadata = {"channel": "chatwoot", "account_id": account, "conversation_id": conversation,
                    "message_id": event.id}
        # The message key makes the turn idempotent: a replica killed between committing the turn
        # and committing the outbox leaves the turn without its dedupe keys; the platform's retry
        # then replays the stored reply into the outbox instead of answering twice.
        reply = await webhooks.runtime.respond(session, text, metadata, key=keys[-1])
        actions = _chatwoot_actions(session, account, conversation, reply)
        outcome = await outbox.submit(keys, actions)
    log_fields(request, intent=reply.intent, action=reply.action, model_version=reply.model_version)
    if isinstance(outcome, Duplicate):
        webhooks.count("chatwoot", "duplicate")
        return JSONResponse({"status": "duplicate"})
    webhooks.count("chatwoot", "accepted")
    return JSONResponse({"status": "accepted", "action": reply.action, "queued": len(actions)})


async def _chatwoot_unprintable(webhooks: Webhooks, session: str, account: int, conversation: int,
                                keys: list[str]) -> JSONResponse:
    """A Chatwoot message holding control characters: acknowledged (200) and handed to a person.

    A 4xx would make Chatwoot count a failed delivery; ignoring it would leave the customer
    waiting in a conversation the bot owns. So the bot neither classifies nor stores the text
    (the turn is not recorded), goes silent in the conversation, and opens it to agents, who
    see the message in Chatwoot itself. Deduplicated like any delivery."""
    outbox = webhooks.require_outbox()
    async with _conversation(webhooks, outbox, session):
        if await outbox.seen(keys) is not None:
            webhooks.count("chatwoot", "duplicate")
            return JSONResponse({"status": "duplicate"})
        await _apply(webhooks.runtime, "handoff", session)
        await outbox.submit(keys, [NewAction(session, chatwoot.KIND_OPEN, chatwoot.open_payload(account, conversation))])
    webhooks.count("chatwoot", "unprintable")
    return JSONResponse({"status": "handed_off", "reason": "the message holds control characters; a person takes over"})


def _chatwoot_actions(session: str, account: int, conversation: int, reply: Reply) -> list[NewAction]:
    """The reply to post, then, when the bot has handed off, the conversation to open to humans.

    A silent bot in a conversation Chatwoot still shows as the bot's (`pending`) means an earlier
    handoff did not reach Chatwoot: open it again rather than leave the customer unanswered.
    """
    actions = []
    if reply.text and not reply.silent:
        actions.append(NewAction(session, chatwoot.KIND_MESSAGE,
                                 chatwoot.message_payload(account, conversation, with_links(reply))))
    if reply.handed_off:
        actions.append(NewAction(session, chatwoot.KIND_OPEN, chatwoot.open_payload(account, conversation)))
    return actions


def with_links(reply: Reply) -> str:
    """The reply text, plus a Markdown link to each cited article (Chatwoot renders Markdown)."""
    links = [f"[{source.title}]({source.url})" for source in reply.sources]
    return "\n\n".join([reply.text, *links]) if links else reply.text


def _why_not(event: MessageEvent) -> str:
    if event.event != "message_created":
        return f"{event.event} is not answered"
    if event.message_type != "incoming":
        return f"{event.message_type} messages are not answered"
    if event.private:
        return "private notes are not answered"
    if event.conversation.status != "pending":
        return f"the conversation is {event.conversation.status or 'of unknown status'}: a human has it"
    return "the message has no text"


async def _chatwoot_conversation(webhooks: Webhooks, change: ConversationChange,
                                 delivery_keys: list[str]) -> JSONResponse:
    outbox = webhooks.require_outbox()
    session = chatwoot.session_id(change.account_id, change.conversation_id)
    async with _conversation(webhooks, outbox, session):
        if delivery_keys and await outbox.seen(delivery_keys) is not None:
            webhooks.count("chatwoot", "duplicate")
            return JSONResponse({"status": "duplicate"})
        await _apply(webhooks.runtime, change.command, session)
        if delivery_keys:
            await outbox.submit(delivery_keys, [])
    webhooks.count("chatwoot", "accepted")
    return JSONResponse({"status": "accepted", "command": change.command})


# ----------------------------------------------------------------------------- generic


def _id_text(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


IdText = Annotated[str, BeforeValidator(_id_text), Field(pattern=ID_PATTERN)]


class GenericDelivery(BaseModel):
    """A generic platform's delivery. Unknown fields are ignored (forward compatible)."""

    model_config = ConfigDict(extra="ignore")

    event: Literal["message", "handoff", "release", "resolved"] = "message"
    conversation_id: IdText
    message_id: IdText | None = None
    text: str | None = None
    callback_url: str | None = Field(None, max_length=2048)
    metadata: dict[str, Any] | None = None

    @field_validator("callback_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parts = urlsplit(value)
        except ValueError:
            raise ValueError("callback_url is not a URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("callback_url must be an absolute http:// or https:// URL")
        if parts.username or parts.password:
            raise ValueError("callback_url must not carry credentials; the callback is signed instead")
        return value


async def handle_generic(request: Request) -> JSONResponse:
    webhooks = _webhooks(request)
    secret = _secret(webhooks.settings.webhook_secret)
    if secret is None:
        webhooks.count("generic", "unconfigured")
        raise ApiError(503, "webhook_not_configured",
                       "the generic webhook is off: set SUPPORTBOT_WEBHOOK_SECRET to turn it on")
    _require_json(request)
    raw = await request.body()
    _verify(webhooks, "generic", secret, request, raw, signing.SUPPORTBOT)
    delivery = _delivery_id(request, signing.SUPPORTBOT, required=True)
    try:
        body = GenericDelivery.model_validate(_json(raw))
    except ValidationError as exc:
        webhooks.count("generic", "invalid")
        raise ApiError(422, "invalid_request", describe_validation_errors(exc)) from None
    check_metadata(body.metadata)
    session = f"generic:{body.conversation_id}"
    log_fields(request, webhook="generic", event=body.event, delivery_id=delivery, session_id=session)
    if body.callback_url is not None:
        _check_callback(webhooks, request, body.callback_url)
    if body.event != "message":
        return await _generic_command(webhooks, body, session, delivery)
    return await _generic_message(request, webhooks, body, session, delivery)


def _check_callback(webhooks: Webhooks, request: Request, url: str) -> None:
    """422 `callback_not_allowed` for a callback_url the policy refuses, before anything is recorded."""
    try:
        host = webhooks.callback_policy.check_url(url)
    except CallbackRefused as exc:
        webhooks.count("generic", "callback_refused")
        log.warning("generic webhook: callback_url refused: %s", exc)
        raise ApiError(422, "callback_not_allowed", f"callback_url: {exc}") from None
    log_fields(request, callback_host=host)


async def _generic_command(webhooks: Webhooks, body: GenericDelivery, session: str, delivery: str) -> JSONResponse:
    outbox = webhooks.require_outbox()
    command = {"handoff": "handoff", "release": "release", "resolved": "reset"}[body.event]
    keys = [f"generic:delivery:{delivery}"]
    async with _conversation(webhooks, outbox, session):
        if await outbox.seen(keys) is not None:
            webhooks.count("generic", "duplicate")
            return JSONResponse({"status": "duplicate"})
        await _apply(webhooks.runtime, command, session)
        await outbox.submit(keys, [])
    webhooks.count("generic", "accepted")
    return JSONResponse({"status": "accepted", "event": body.event})


async def _generic_message(request: Request, webhooks: Webhooks, body: GenericDelivery, session: str,
                           delivery: str) -> JSONResponse:
    if body.message_id is None or body.text is None:
        webhooks.count("generic", "invalid")
        raise ApiError(422, "invalid_request", "a message needs message_id and text")
    check_message(body.text, limit=webhooks.settings.max_message_chars, name="text")
    outbox = webhooks.require_outbox()
    keys = [f"generic:delivery:{delivery}", f"generic:message:{body.conversation_id}:{body.message_id}"]
    log_fields(request, message_text=body.text)
    async with _conversation(webhooks, outbox, session):
        first = await outbox.seen(keys)
        if first is not None:
            webhooks.count("generic", "duplicate")
            return JSONResponse({**(first.result or {}), "status": "duplicate"})
        metadata = {**(body.metadata or {}), "channel": "generic", "conversation_id": body.conversation_id,
                    "message_id": body.message_id}
        reply = await webhooks.runtime.respond(session, body.text, metadata, key=keys[-1])  # idempotent, as Chatwoot's
        answer, actions = _generic_outcome(body, reply)
        outcome = await outbox.submit(keys, actions, result=answer)
    log_fields(request, intent=reply.intent, action=reply.action, model_version=reply.model_version)
    if isinstance(outcome, Duplicate):
        webhooks.count("generic", "duplicate")
        return JSONResponse({**(outcome.result or {}), "status": "duplicate"})
    webhooks.count("generic", "accepted")
    return JSONResponse(answer, status_code=202 if body.callback_url else 200)


def _generic_outcome(body: GenericDelivery, reply: Reply) -> tuple[dict[str, Any], list[NewAction]]:
    """(the response body, the outbox actions): the reply inline, or a signed callback to send."""
    message = {"event": "reply", "conversation_id": body.conversation_id, "in_reply_to": body.message_id,
               "reply": ChatResponse.from_reply(reply).model_dump(mode="json")}
    if body.callback_url is None:
        return {"status": "answered", **message}, []
    if reply.silent:
        return {"status": "accepted", "callback_delivery_id": None}, []
    callback_delivery = str(uuid.uuid4())
    action = NewAction(f"generic:{body.conversation_id}", KIND_CALLBACK,
                       {"url": body.callback_url, "delivery_id": callback_delivery, "body": message})
    return {"status": "accepted", "callback_delivery_id": callback_delivery}, [action]


# ----------------------------------------------------------------------------- router


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI for a route that reads its raw body itself (the signature covers the exact bytes)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


# FastAPI's `responses` type: status -> OpenAPI response object.
_ERRORS: dict[int | str, dict[str, Any]] = {status: {"description": text} for status, text in [
    (400, "not JSON, or a bad delivery id"), (401, "missing, bad or stale signature"),
    (413, "body too large"), (415, "the body is not declared as application/json"),
    (422, "a field is missing or invalid"),
    (429, "try again after Retry-After (model loading, overload, shutdown)"),
    (503, "this webhook is not configured"),
]}


def build_webhook_router() -> APIRouter:
    # Chatwoot retries a delivery only on 429 (and 500): transient refusals answer 429 here.
    router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], dependencies=[Depends(answer_transient_with(429))])
    router.add_api_route(
        "/chatwoot", handle_chatwoot, methods=["POST"], summary="Chatwoot Agent Bot events",
        description="Chatwoot's Agent Bot deliveries (message and conversation events), verified with "
                    "X-Chatwoot-Signature when SUPPORTBOT_CHATWOOT_SECRET is set. See docs/webhooks.md.",
        openapi_extra=_json_body({"type": "object", "required": ["event"],
                                  "properties": {"event": {"type": "string"}}, "additionalProperties": True}),
        responses=_ERRORS,
    )
    router.add_api_route(
        "/generic", handle_generic, methods=["POST"], summary="Generic signed webhook",
        description="A customer message (or a conversation event) from any platform, signed with "
                    "X-Supportbot-Signature (SUPPORTBOT_WEBHOOK_SECRET). The reply is in the response (200) "
                    "or sent to callback_url (202). See docs/webhooks.md.",
        openapi_extra=_json_body(GenericDelivery.model_json_schema()),
        responses={202: {"description": "accepted; the reply goes to callback_url"}, **_ERRORS,
                   422: {"description": "a field is missing or invalid, or callback_url's host is not allowed "
                                        "(SUPPORTBOT_CALLBACK_HOSTS, or not a public address)"}},
    )
    return router
