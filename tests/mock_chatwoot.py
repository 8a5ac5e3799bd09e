"""A mock Chatwoot for the tests: a real HTTP server on loopback, plus deliveries built as Chatwoot builds them.

`MockChatwoot` answers the application-API calls an Agent Bot makes (post a message, toggle a
conversation's status, list a conversation's latest messages), checks the `api_access_token`,
records every request, and can fail the next N requests (with a status, or by dropping the
connection) or delay its answers. A delayed message is still created, as Chatwoot creates it
when it answers after the client's timeout; the list shows it (Chatwoot's messages index: the
last 20, oldest first, `message_type` as its integer, `created_at` in whole seconds). Like Chatwoot,
when a conversation is opened through the API it tells the bot: it POSTs signed
`conversation_opened` and `conversation_status_changed` events to `bot_url`.

It also serves as a generic callback receiver: any POST under /hooks/ is recorded and answered 200.

The payload builders follow Chatwoot 4.x's `Message#webhook_data` and
`Conversations::EventDataPresenter#push_data`; `signed_body` signs them as Chatwoot's
`Webhooks::Trigger` does (compact JSON, `sha256=` HMAC over "{timestamp}.{body}").
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from serve import signing

ROUTE = re.compile(r"^/api/v1/accounts/(\d+)/conversations/(\d+)/(messages|toggle_status)$")


@dataclass
class Recorded:
    """One request the mock received, and what it answered."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 0
    at: float = field(default_factory=time.time)

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class MockChatwoot:
    """Use as a context manager: `with MockChatwoot(token=...) as chatwoot: ... chatwoot.url ...`."""

    def __init__(self, token: str = "cw-token", *, bot_url: str | None = None, secret: str | None = None):
        self.token = token
        self.bot_url = bot_url
        self.secret = secret
        self.delay_s = 0.0
        self.unknown: set[tuple[int, int]] = set()
        self.statuses: dict[tuple[int, int], str] = {}
        self.requests: list[Recorded] = []
        self.bot_deliveries: list[tuple[int, str, httpx.Response]] = []  # (conversation, event, bot's answer)
        self.hang_s = 1.0
        self._failures: list[tuple[int | str, str]] = []
        self._lock = threading.Lock()
        self._next_message_id = 1000
        self.messages: dict[tuple[int, int], list[dict[str, Any]]] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None
        self._notifiers: list[threading.Thread] = []

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> MockChatwoot:
        self._thread = threading.Thread(target=self._server.serve_forever, name="mock-chatwoot", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        for notifier in self._notifiers:
            notifier.join(timeout=10)
        self._server.shutdown()
        self._server.server_close()

    # --- behaviour -------------------------------------------------------------------------

    def fail_next(self, count: int, status: int | str = 500, *, path_contains: str = "") -> None:
        """Fail the next `count` requests (whose path contains `path_contains`): answer `status`, or
        "disconnect" (drop the connection at once), or "hang" (say nothing for `hang_s`, then drop it).
        Lists of messages (GET) fail only for a `path_contains` ending in "#GET"."""
        with self._lock:
            self._failures.extend([(status, path_contains)] * count)

    def clear_failures(self) -> None:
        """Chatwoot is healthy again: drop the failures not yet used."""
        with self._lock:
            self._failures.clear()

    def _take_failure(self, path: str) -> int | str | None:
        with self._lock:
            for index, (status, fragment) in enumerate(self._failures):
                if path.endswith("#GET") != fragment.endswith("#GET"):
                    continue  # a list of messages fails only when asked for by name ("...#GET")
                if fragment in path:
                    del self._failures[index]
                    return status
        return None

    # --- what happened ---------------------------------------------------------------------

    def received(self, kind: str | None = None, *, ok_only: bool = True) -> list[Recorded]:
        """Requests to the messages or toggle_status routes (or under /hooks/ for "hooks", "list" for the
        message lists read), in arrival order."""
        with self._lock:
            requests = list(self.requests)
        out = []
        for request in requests:
            match = ROUTE.match(request.path)
            route = match.group(3) if match else ("hooks" if request.path.startswith("/hooks/") else None)
            if request.method == "GET":
                route = "list"  # a list of the latest messages, not a message posted
            if (kind is None or route == kind) and (not ok_only or 200 <= request.status < 300):
                out.append(request)
        return out

    def replies(self, account_id: int | None = None, conversation_id: int | None = None) -> list[str]:
        """Contents of the messages accepted (200), in arrival order, optionally for one conversation."""
        prefix = (f"/api/v1/accounts/{account_id}/conversations/{conversation_id}/"
                  if account_id is not None else "/api/v1/accounts/")
        return [r.json["content"] for r in self.received("messages") if r.path.startswith(prefix)]

    def wait_for(self, predicate, timeout: float = 15.0, interval: float = 0.02) -> bool:
        """Poll `predicate()` until it is true or `timeout` passes (bounded in time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(interval)
        return bool(predicate())

    # --- the server ------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        mock = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                recorded = Recorded("GET", self.path, {k.lower(): v for k, v in self.headers.items()}, b"")
                with mock._lock:
                    mock.requests.append(recorded)
                failure = mock._take_failure(self.path + "#GET")
                if failure is not None and failure not in ("disconnect", "hang"):
                    return self._answer(recorded, int(failure), {"error": "injected failure"})
                match = ROUTE.match(self.path)
                if not match or match.group(3) != "messages":
                    return self._answer(recorded, 404, {"error": "Resource could not be found"})
                if recorded.headers.get("api_access_token") != mock.token:
                    return self._answer(recorded, 401, {"error": "Invalid Access Token"})
                with mock._lock:
                    listed = list(mock.messages.get((int(match.group(1)), int(match.group(2))), []))[-20:]
                self._answer(recorded, 200, {"meta": {"labels": [], "contact": {}}, "payload": listed})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorded = Recorded("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with mock._lock:
                    mock.requests.append(recorded)
                failure = mock._take_failure(self.path)
                if failure in ("disconnect", "hang"):
                    recorded.status = -1  # no answer
                    time.sleep(mock.hang_s if failure == "hang" else 0.0)
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if mock.delay_s:
                    time.sleep(mock.delay_s)
                if failure is not None:
                    return self._answer(recorded, int(failure), {"error": "injected failure"})
                status, answer = mock._route(recorded)
                self._answer(recorded, status, answer)

            def _answer(self, recorded: Recorded, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                recorded.status = status
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def _route(self, request: Recorded) -> tuple[int, Any]:
        if request.path.startswith("/hooks/"):
            return 200, {"ok": True}
        match = ROUTE.match(request.path)
        if not match:
            return 404, {"error": "Resource could not be found"}
        if request.headers.get("api_access_token") != self.token:
            return 401, {"error": "Invalid Access Token"}
        account_id, conversation_id, route = int(match.group(1)), int(match.group(2)), match.group(3)
        if (account_id, conversation_id) in self.unknown:
            return 404, {"error": "Resource could not be found"}
        try:
            body = request.json
        except ValueError:
            return 422, {"error": "invalid JSON"}
        if route == "messages":
            return self._create_message(conversation_id, body, account_id)
        return self._toggle_status(account_id, conversation_id, body)

    def _create_message(self, conversation_id: int, body: dict[str, Any], account_id: int = 1) -> tuple[int, Any]:
        with self._lock:
            self._next_message_id += 1
            message_id = self._next_message_id
            message = {
                "id": message_id, "content": body.get("content"), "conversation_id": conversation_id,
                "message_type": 1 if body.get("message_type") == "outgoing" else 0, "content_type": "text",
                "private": bool(body.get("private")), "created_at": int(time.time()), "source_id": None,
                "sender": {"id": 7, "name": "supportbot", "type": "agent_bot"},
            }
            self.messages.setdefault((account_id, conversation_id), []).append(message)
        return 200, message

    def _toggle_status(self, account_id: int, conversation_id: int, body: dict[str, Any]) -> tuple[int, Any]:
        key = (account_id, conversation_id)
        with self._lock:
            previous = self.statuses.get(key, "pending")
            current = body.get("status") or ("open" if previous != "open" else "resolved")
            self.statuses[key] = current
        if current == "open" and previous != "open" and self.bot_url:
            notifier = threading.Thread(target=self._notify_opened, args=(account_id, conversation_id, previous),
                                        daemon=True)
            self._notifiers.append(notifier)
            notifier.start()
        return 200, {"meta": {}, "payload": {"success": True, "conversation_id": conversation_id,
                                             "current_status": current, "snoozed_until": None}}

    def _notify_opened(self, account_id: int, conversation_id: int, previous: str) -> None:
        """What Chatwoot does after the status change commits: tell the Agent Bot, signed, in order."""
        change = [{"status": {"previous_value": previous, "current_value": "open"}}]
        for event in ("conversation_opened", "conversation_status_changed"):
            body = conversation_event(event, account_id=account_id, conversation_id=conversation_id,
                                      status="open", changed_attributes=change)
            response = deliver(self.bot_url, body, secret=self.secret)
            with self._lock:
                self.bot_deliveries.append((conversation_id, event, response))


# --- payloads as Chatwoot builds them ---------------------------------------------------------


def _iso(ts: float | None = None) -> str:
    return datetime.fromtimestamp(ts or time.time(), tz=UTC).isoformat().replace("+00:00", "Z")


def contact(contact_id: int = 11) -> dict[str, Any]:
    return {"id": contact_id, "name": "Anna Kowalski", "avatar": "", "type": "contact",
            "account": {"id": 1, "name": "Northwind"}, "additional_attributes": {}, "custom_attributes": {},
            "email": "anna.k@example.com", "identifier": None, "phone_number": None, "thumbnail": "",
            "blocked": False}


def conversation_data(*, account_id: int = 1, conversation_id: int = 1, status: str = "pending", inbox_id: int = 1,
                      last_message: dict[str, Any] | None = None) -> dict[str, Any]:
    """Conversations::EventDataPresenter#push_data: `id` is the display id."""
    now = int(time.time())
    return {
        "additional_attributes": {"browser": {"browser_name": "Firefox"}}, "can_reply": True,
        "channel": "Channel::WebWidget",
        "contact_inbox": {"id": 5, "contact_id": 11, "inbox_id": inbox_id, "source_id": str(uuid.uuid4()),
                          "hmac_verified": False, "pubsub_token": "tok"},
        "id": conversation_id, "inbox_id": inbox_id,
        "messages": [last_message] if last_message else [],
        "labels": [], "meta": {"sender": contact(), "assignee": None, "assignee_type": None, "team": None,
                               "hmac_verified": False},
        "status": status, "custom_attributes": {}, "snoozed_until": None, "unread_count": 1,
        "first_reply_created_at": None, "priority": None, "waiting_since": now,
        "agent_last_seen_at": 0, "contact_last_seen_at": 0, "last_activity_at": now, "timestamp": now,
        "created_at": now, "updated_at": float(now),
    }


def message_event(content: str | None, *, message_id: int, account_id: int = 1, conversation_id: int = 1,
                  message_type: str = "incoming", private: bool = False, status: str = "pending",
                  event: str = "message_created", inbox_id: int = 1) -> dict[str, Any]:
    """Message#webhook_data merged with `event`."""
    if message_type == "incoming":
        sender = contact()
    else:
        sender = {"id": 3, "name": "Agent Smith", "email": "smith@example.com", "type": "user"}
    push = {"id": message_id, "content": content, "account_id": account_id, "inbox_id": inbox_id,
            "conversation_id": conversation_id, "message_type": {"incoming": 0, "outgoing": 1, "template": 3}.get(
                message_type, 2), "created_at": int(time.time()), "private": private, "source_id": None}
    return {
        "account": {"id": account_id, "name": "Northwind"},
        "additional_attributes": {},
        "content_attributes": {},
        "content_type": "text",
        "content": content,
        "conversation": conversation_data(account_id=account_id, conversation_id=conversation_id, status=status,
                                          inbox_id=inbox_id, last_message=push),
        "created_at": _iso(),
        "id": message_id,
        "inbox": {"id": inbox_id, "name": "Website"},
        "message_type": message_type,
        "private": private,
        "sender": sender,
        "source_id": None,
        "event": event,
    }


def conversation_event(event: str, *, account_id: int = 1, conversation_id: int = 1, status: str = "open",
                       changed_attributes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Conversation#webhook_data merged with `event` (and `changed_attributes` for the status events)."""
    last = {"id": 1, "content": "hello", "account_id": account_id, "inbox_id": 1,
            "conversation_id": conversation_id, "message_type": 0, "created_at": int(time.time()), "private": False}
    body = conversation_data(account_id=account_id, conversation_id=conversation_id, status=status, last_message=last)
    body["event"] = event
    if changed_attributes is not None:
        body["changed_attributes"] = changed_attributes
    return body


def signed_body(body: dict[str, Any], *, secret: str | None, delivery_id: str | None = None,
                timestamp: float | None = None) -> tuple[bytes, dict[str, str]]:
    """Raw bytes and headers as Chatwoot sends a delivery (unsigned when there is no secret)."""
    raw = json.dumps(body, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "rest-client/2.1.0"}
    if secret is not None:
        headers.update(signing.sign(secret, raw, signing.CHATWOOT, delivery_id=delivery_id, now=timestamp))
    elif delivery_id:
        headers[signing.CHATWOOT.delivery] = delivery_id
    return raw, headers


def deliver(url: str, body: dict[str, Any], *, secret: str | None, delivery_id: str | None = None,
            timestamp: float | None = None, client: httpx.Client | None = None) -> httpx.Response:
    """POST one delivery to the bot, as Chatwoot does (5 s timeout)."""
    raw, headers = signed_body(body, secret=secret, delivery_id=delivery_id, timestamp=timestamp)
    if client is not None:
        return client.post(url, content=raw, headers=headers, timeout=5.0)
    return httpx.post(url, content=raw, headers=headers, timeout=5.0)
