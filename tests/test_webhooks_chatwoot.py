"""supportbot as a Chatwoot Agent Bot: the real shop model on a real uvicorn server (loopback),
signed deliveries built as Chatwoot builds them, replies through a mock Chatwoot API server."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import httpx
import pytest
from mock_chatwoot import MockChatwoot, conversation_event, deliver, message_event, signed_body
from serve_helpers import asgi_client, live_server, make_settings

from serve import signing
from serve.app import create_app

SECRET = "cw-agent-bot-secret"
TOKEN = "cw-agent-bot-token"
ADMIN_TOKEN = "cw-admin-token-6d0c"  # reads transcripts of webhook sessions (the chat API may not)
FAST_OUTBOX = {"outbox_backoff_base_s": 0.05, "outbox_backoff_cap_s": 0.2, "outbox_max_attempts": 6,
               "outbox_send_timeout_s": 3.0}
# Clear, in-scope questions (no slots to fill, no handoff): each gets an answer.
QUESTIONS = ["what are your opening hours", "which payment methods do you accept", "do you ship abroad",
             "where is your shop located", "what shipping options do you have", "thank you",
             "how do I create an account", "hello there", "can I get an invoice for my purchase",
             "how long is the warranty"]

_ids = iter(range(10_000, 1_000_000))


def new_id() -> int:
    return next(_ids)


@pytest.fixture(scope="module")
def chatwoot():
    with MockChatwoot(token=TOKEN, secret=SECRET) as mock:
        yield mock


@pytest.fixture(scope="module")
def server(shop_bundle, tmp_path_factory, chatwoot):
    settings = make_settings(shop_bundle, tmp_path_factory.mktemp("chatwoot-webhook"), chatwoot_url=chatwoot.url,
                             chatwoot_token=TOKEN, chatwoot_secret=SECRET, admin_token=ADMIN_TOKEN, **FAST_OUTBOX)
    with live_server(settings) as live:
        chatwoot.bot_url = f"{live.url}/v1/webhooks/chatwoot"
        yield live


@pytest.fixture()
def hook(server):
    return f"{server.url}/v1/webhooks/chatwoot"


def transcript_replies(server, conversation_id: int, account_id: int = 1) -> list[str]:
    turns = httpx.get(f"{server.url}/v1/sessions/chatwoot:{account_id}:{conversation_id}", timeout=10,
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()["turns"]
    return [t["text"] for t in turns if t["role"] == "bot" and t["text"]]


def settle(seconds: float = 0.4) -> None:
    """Room for a wrong extra send to show up before asserting that nothing more was sent."""
    time.sleep(seconds)


# ---------------------------------------------------------------------------- replies


def test_signed_incoming_message_gets_exactly_one_reply(server, chatwoot, hook):
    conversation, message = new_id(), new_id()
    response = deliver(hook, message_event("what are your opening hours", message_id=message,
                                           conversation_id=conversation), secret=SECRET)
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "accepted", "action": "answer", "queued": 1}
    assert chatwoot.wait_for(lambda: chatwoot.replies(1, conversation))
    settle()
    [request] = chatwoot.received("messages", ok_only=False)[-1:]
    assert request.path == f"/api/v1/accounts/1/conversations/{conversation}/messages"
    assert request.headers["api_access_token"] == TOKEN
    assert request.json["message_type"] == "outgoing" and request.json["private"] is False
    assert chatwoot.replies(1, conversation) == transcript_replies(server, conversation)
    assert len(chatwoot.replies(1, conversation)) == 1 and chatwoot.replies(1, conversation)[0]


def test_account_and_conversation_make_the_session(server, chatwoot, hook):
    conversation = new_id()
    for account in (1, 2):
        body = message_event("hello there", message_id=new_id(), account_id=account, conversation_id=conversation)
        assert deliver(hook, body, secret=SECRET).status_code == 200
    assert chatwoot.wait_for(lambda: chatwoot.replies(1, conversation) and chatwoot.replies(2, conversation))
    assert len(transcript_replies(server, conversation, 1)) == len(transcript_replies(server, conversation, 2)) == 1


@pytest.mark.parametrize("variant", [
    {"message_type": "outgoing"},
    {"message_type": "template"},
    {"private": True},
    {"status": "open"},
    {"status": "snoozed"},
    {"event": "message_updated"},
    {"content": ""},
    {"content": None},
])
def test_messages_the_bot_must_not_answer(server, chatwoot, hook, variant):
    conversation = new_id()
    fields = {"content": "where are you located", **variant}
    body = message_event(fields.pop("content"), message_id=new_id(), conversation_id=conversation, **fields)
    response = deliver(hook, body, secret=SECRET)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ignored"
    settle(0.3)
    assert chatwoot.replies(1, conversation) == []
    assert httpx.get(f"{server.url}/v1/sessions/chatwoot:1:{conversation}",
                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 404


def test_unknown_events_and_fields_are_ignored(server, chatwoot, hook):
    assert deliver(hook, {"event": "webwidget_triggered", "id": 5, "event_info": {}}, secret=SECRET).json() == {
        "status": "ignored", "reason": "event 'webwidget_triggered' is not handled"}
    assert deliver(hook, {"event": "contact_created", "id": 1}, secret=SECRET).status_code == 200
    conversation = new_id()
    body = message_event("thank you", message_id=new_id(), conversation_id=conversation)
    body["a_field_from_chatwoot_5"] = {"nested": [1, 2]}
    body["conversation"]["another_new_field"] = True
    assert deliver(hook, body, secret=SECRET).json()["status"] == "accepted"
    assert chatwoot.wait_for(lambda: chatwoot.replies(1, conversation))


def test_malformed_deliveries_get_clear_4xx(server, chatwoot, hook):
    raw, headers = signed_body({"event": "message_created"}, secret=SECRET)
    bad_json = b'{"event": "message_created",'
    response = httpx.post(hook, content=bad_json, headers={**signing.sign(SECRET, bad_json, signing.CHATWOOT),
                                                            "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    response = httpx.post(hook, content=raw, headers=headers)
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_event"
    assert "id" in response.json()["error"]["message"]
    response = deliver(hook, ["not", "an", "object"], secret=SECRET)  # type: ignore[arg-type]
    assert response.status_code == 422
    long = message_event("x" * 5000, message_id=new_id(), conversation_id=new_id())
    response = deliver(hook, long, secret=SECRET)
    assert response.status_code == 422 and response.json()["error"]["code"] == "message_too_long"
    assert httpx.get(f"{server.url}/healthz").status_code == 200


# ---------------------------------------------------------------------------- dedupe


def test_the_same_delivery_twice_yields_one_reply(server, chatwoot, hook):
    conversation, message = new_id(), new_id()
    raw, headers = signed_body(message_event("do you ship abroad", message_id=message, conversation_id=conversation),
                               secret=SECRET, delivery_id="8d3b5c0e-3f5a-4b8e-9c1d-000000000001")
    first = httpx.post(hook, content=raw, headers=headers)
    second = httpx.post(hook, content=raw, headers=headers)
    assert first.json()["status"] == "accepted" and second.json() == {"status": "duplicate"}
    assert chatwoot.wait_for(lambda: chatwoot.replies(1, conversation))
    settle()
    assert len(chatwoot.replies(1, conversation)) == 1
    assert len(transcript_replies(server, conversation)) == 1


def test_the_same_message_under_two_delivery_ids_yields_one_reply(server, chatwoot, hook):
    conversation, message = new_id(), new_id()
    body = message_event("how long is the warranty", message_id=message, conversation_id=conversation)
    assert deliver(hook, body, secret=SECRET, delivery_id="first").json()["status"] == "accepted"
    assert deliver(hook, body, secret=SECRET, delivery_id="second").json() == {"status": "duplicate"}
    assert chatwoot.wait_for(lambda: chatwoot.replies(1, conversation))
    settle()
    assert len(chatwoot.replies(1, conversation)) == 1


def test_a_turn_committed_by_a_replica_killed_before_its_outbox_commit_is_replayed_once(server, chatwoot, hook):
    """The crash window between the two commits: the turn is stored (under the message's key) but
    neither the dedupe keys nor the reply reached the outbox. The platform's retry must queue the
    stored reply, once, and store no second turn."""
    conversation, message = new_id(), new_id()
    session = f"chatwoot:1:{conversation}"
    metadata = {"channel": "chatwoot", "account_id": 1, "conversation_id": conversation, "message_id": message}
    stored = server.runtime.chatbot.respond(session, "what are your opening hours", metadata=metadata,
                                            key=f"chatwoot:message:1:{message}")
    body = message_event("what are your opening hours", message_id=message, conversation_id=conversation)
    retry = deliver(hook, body, secret=SECRET, delivery_id=f"retry-{message}")
    assert retry.json() == {"status": "accepted", "action": "answer", "queued": 1}
    assert deliver(hook, body, secret=SECRET, delivery_id=f"retry-{message}").json() == {"status": "duplicate"}
    assert chatwoot.wait_for(lambda: chatwoot.replies(1, conversation))
    settle()
    assert chatwoot.replies(1, conversation) == [stored.text]
    turns = server.runtime.chatbot.transcript(session)
    assert [t["role"] for t in turns] == ["user", "bot"] and turns[0]["metadata"]["message_id"] == message


def test_simultaneous_duplicates_yield_one_reply(server, chatwoot, hook):
    conversation, message = new_id(), new_id()
    body = message_event("what shipping options do you have", message_id=message, conversation_id=conversation)
    results: list[httpx.Response] = []

    def send(delivery: str) -> None:
        results.append(deliver(hook, body, secret=SECRET, delivery_id=delivery))

    threads = [threading.Thread(target=send, args=(f"dup-{i % 2}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(r.json()["status"] for r in results) == ["accepted"] + ["duplicate"] * 5
    assert chatwoot.wait_for(lambda: chatwoot.replies(1, conversation))
    settle()
    assert len(chatwoot.replies(1, conversation)) == 1
    assert len(transcript_replies(server, conversation)) == 1


# ---------------------------------------------------------------------------- signatures


def test_bad_missing_or_stale_signatures_are_refused_and_nothing_is_sent(server, chatwoot, hook):
    conversation, message = new_id(), new_id()
    body = message_event("where is your shop located", message_id=message, conversation_id=conversation)
    raw, good = signed_body(body, secret=SECRET, delivery_id="sig-1")
    cases = {
        "bad_signature": {**good, "X-Chatwoot-Signature": "sha256=" + "0" * 64},
        "wrong_secret": signed_body(body, secret="not-the-secret", delivery_id="sig-1")[1],
        "missing_signature": {k: v for k, v in good.items() if k != "X-Chatwoot-Signature"},
        "stale_timestamp": signed_body(body, secret=SECRET, delivery_id="sig-1", timestamp=time.time() - 301)[1],
        "future_timestamp": signed_body(body, secret=SECRET, delivery_id="sig-1", timestamp=time.time() + 400)[1],
    }
    for name, headers in cases.items():
        response = httpx.post(hook, content=raw, headers=headers)
        assert response.status_code == 401, name
        error = response.json()["error"]
        assert error["code"] in {"bad_signature", "missing_signature", "stale_timestamp"}, name
        assert SECRET not in response.text
    tampered = raw.replace(b"where is your shop located", b"give me all the refunds!!!")
    assert httpx.post(hook, content=tampered, headers=good).status_code == 401
    settle()
    assert chatwoot.replies(1, conversation) == []
    # Refusals record nothing: the genuine delivery (same id) still gets its one reply.
    assert httpx.post(hook, content=raw, headers=good).json()["status"] == "accepted"
    assert chatwoot.wait_for(lambda: len(chatwoot.replies(1, conversation)) == 1)


# ---------------------------------------------------------------------------- delivery


def test_chatwoot_failing_the_first_three_attempts_gets_the_reply_once(server, chatwoot, hook):
    conversation = new_id()
    chatwoot.fail_next(3, 500, path_contains=f"/conversations/{conversation}/")
    body = message_event("which payment methods do you accept", message_id=new_id(), conversation_id=conversation)
    assert deliver(hook, body, secret=SECRET).json()["status"] == "accepted"
    assert chatwoot.wait_for(lambda: chatwoot.replies(1, conversation))
    settle()
    attempts = [r.status for r in chatwoot.received("messages", ok_only=False) if f"/{conversation}/" in r.path]
    assert attempts == [500, 500, 500, 200]
    assert len(chatwoot.replies(1, conversation)) == 1


def test_acknowledged_fast_even_when_chatwoot_is_slow(server, chatwoot, hook):
    conversation = new_id()
    chatwoot.hang_s = 4.0  # Chatwoot's API says nothing for 4 s, then drops the connection
    chatwoot.fail_next(1, "hang", path_contains=f"/conversations/{conversation}/")
    started = time.perf_counter()
    response = deliver(hook, message_event("thank you", message_id=new_id(), conversation_id=conversation),
                       secret=SECRET)
    assert response.status_code == 200 and time.perf_counter() - started < 2.5  # Chatwoot waits 5 s at most
    assert chatwoot.wait_for(lambda: chatwoot.replies(1, conversation), timeout=20)


def test_metrics_count_deliveries_and_the_outbox(server, chatwoot, hook):
    conversation = new_id()
    deliver(hook, message_event("hello there", message_id=new_id(), conversation_id=conversation), secret=SECRET)
    assert chatwoot.wait_for(lambda: chatwoot.replies(1, conversation))
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("supportbot_outbox_sent_total", "supportbot_outbox_queue_depth",
                 "supportbot_outbox_oldest_pending_age_seconds", "supportbot_webhook_deliveries_total"):
        assert name in text, name
    assert 'supportbot_webhook_deliveries_total{outcome="accepted",platform="chatwoot"}' in text
    assert 'supportbot_outbox_sent_total{kind="chatwoot.message"}' in text


# ---------------------------------------------------------------------------- handoff


def test_handoff_opens_the_conversation_and_the_bot_stays_silent_until_resolved(server, chatwoot, hook):
    conversation = new_id()
    response = deliver(hook, message_event("I want to talk to a human agent", message_id=new_id(),
                                           conversation_id=conversation), secret=SECRET)
    assert response.json() == {"status": "accepted", "action": "handoff", "queued": 2}
    def told_bot() -> list[tuple[str, dict]]:
        return [(event, r.json()) for c, event, r in chatwoot.bot_deliveries if c == conversation]

    assert chatwoot.wait_for(lambda: len(told_bot()) == 2)
    [toggle] = [r for r in chatwoot.received("toggle_status") if f"/{conversation}/" in r.path]
    assert toggle.json == {"status": "open"} and toggle.headers["api_access_token"] == TOKEN
    handoff_reply = chatwoot.replies(1, conversation)
    assert len(handoff_reply) == 1 and handoff_reply[0]  # words to the customer first, then the status change
    [reply_request] = [r for r in chatwoot.received("messages") if f"/{conversation}/" in r.path]
    assert reply_request.at <= toggle.at
    # Chatwoot told the bot about the change (signed, like any delivery) and the bot took it as a handoff.
    assert told_bot() == [("conversation_opened", {"status": "accepted", "command": "handoff"}),
                          ("conversation_status_changed", {"status": "accepted", "command": "handoff"})]

    # A human has it: messages in the open conversation get nothing from the bot.
    for text in ("hello?", "where is my order"):
        body = message_event(text, message_id=new_id(), conversation_id=conversation, status="open")
        assert deliver(hook, body, secret=SECRET).json()["status"] == "ignored"
    # Even if one arrives while Chatwoot still says pending, the bot stays silent (and re-opens).
    body = message_event("are you there", message_id=new_id(), conversation_id=conversation, status="pending")
    assert deliver(hook, body, secret=SECRET).json() == {"status": "accepted", "action": "handoff", "queued": 1}
    settle()
    assert chatwoot.replies(1, conversation) == handoff_reply

    # Resolved: the session resets, and the next conversation starts fresh with the bot answering.
    resolved = conversation_event("conversation_resolved", conversation_id=conversation, status="resolved",
                                  changed_attributes=[{"status": {"previous_value": "open",
                                                                  "current_value": "resolved"}}])
    assert deliver(hook, resolved, secret=SECRET).json() == {"status": "accepted", "command": "reset"}
    body = message_event("what are your opening hours", message_id=new_id(), conversation_id=conversation)
    assert deliver(hook, body, secret=SECRET).json()["action"] == "answer"
    assert chatwoot.wait_for(lambda: len(chatwoot.replies(1, conversation)) == 2)


def test_a_human_taking_over_silences_the_bot_and_giving_back_releases_it(server, chatwoot, hook):
    conversation = new_id()
    deliver(hook, message_event("hello there", message_id=new_id(), conversation_id=conversation), secret=SECRET)
    assert chatwoot.wait_for(lambda: len(chatwoot.replies(1, conversation)) == 1)
    opened = conversation_event("conversation_opened", conversation_id=conversation, status="open",
                                changed_attributes=[{"status": {"previous_value": "pending", "current_value": "open"}}])
    assert deliver(hook, opened, secret=SECRET).json() == {"status": "accepted", "command": "handoff"}
    body = message_event("thank you", message_id=new_id(), conversation_id=conversation, status="pending")
    assert deliver(hook, body, secret=SECRET).json()["queued"] == 1  # only the re-open, no words
    settle()
    assert len(chatwoot.replies(1, conversation)) == 1
    back = conversation_event("conversation_status_changed", conversation_id=conversation, status="pending",
                              changed_attributes=[{"status": {"previous_value": "open", "current_value": "pending"}}])
    assert deliver(hook, back, secret=SECRET).json() == {"status": "accepted", "command": "release"}
    body = message_event("how do I create an account", message_id=new_id(), conversation_id=conversation)
    assert deliver(hook, body, secret=SECRET).json()["action"] == "answer"
    assert chatwoot.wait_for(lambda: len(chatwoot.replies(1, conversation)) == 2)


def test_conversation_events_are_deduplicated_by_delivery(server, chatwoot, hook):
    conversation = new_id()
    resolved = conversation_event("conversation_resolved", conversation_id=conversation, status="resolved")
    assert deliver(hook, resolved, secret=SECRET, delivery_id="res-1").json()["command"] == "reset"
    assert deliver(hook, resolved, secret=SECRET, delivery_id="res-1").json() == {"status": "duplicate"}
    updated = conversation_event("conversation_updated", conversation_id=conversation, status="pending")
    assert deliver(hook, updated, secret=SECRET).json()["status"] == "ignored"


# ---------------------------------------------------------------------------- load


def test_200_concurrent_deliveries_across_20_conversations_each_reply_once_in_order(server, chatwoot, hook):
    conversations = [new_id() for _ in range(20)]
    chatwoot.fail_next(5, 500, path_contains=f"/conversations/{conversations[3]}/")  # one under the give-up bound
    chatwoot.fail_next(4, 429, path_contains=f"/conversations/{conversations[11]}/")

    async def conversation_worker(http: httpx.AsyncClient, conversation: int) -> list[int]:
        statuses = []
        for turn in range(10):
            text = QUESTIONS[(turn + conversation) % len(QUESTIONS)]
            raw, headers = signed_body(message_event(text, message_id=new_id(), conversation_id=conversation),
                                       secret=SECRET)
            statuses.append((await http.post(hook, content=raw, headers=headers)).status_code)
        return statuses

    async def all_conversations() -> list[list[int]]:
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(timeout=30, limits=limits) as http:
            return await asyncio.gather(*(conversation_worker(http, c) for c in conversations))

    started = time.perf_counter()
    statuses = asyncio.run(asyncio.wait_for(all_conversations(), 120))
    assert all(s == 200 for row in statuses for s in row), statuses
    assert chatwoot.wait_for(lambda: all(len(chatwoot.replies(1, c)) >= 10 for c in conversations), timeout=60)
    settle()
    logging.getLogger(__name__).info("200 deliveries acknowledged and replied in %.1f s", time.perf_counter() - started)
    for conversation in conversations:
        sent = chatwoot.replies(1, conversation)
        assert len(sent) == 10, conversation
        assert sent == transcript_replies(server, conversation), f"conversation {conversation} out of order"


# ---------------------------------------------------------------------------- restart


def test_actions_pending_at_shutdown_are_sent_once_after_restart(shop_bundle, tmp_path):
    with MockChatwoot(token=TOKEN, secret=SECRET) as chatwoot:
        settings = make_settings(shop_bundle, tmp_path, chatwoot_url=chatwoot.url, chatwoot_token=TOKEN,
                                 chatwoot_secret=SECRET, outbox_backoff_base_s=0.05, outbox_backoff_cap_s=0.1,
                                 outbox_max_attempts=100, admin_token=ADMIN_TOKEN)
        conversation = new_id()
        first = message_event("what are your opening hours", message_id=new_id(), conversation_id=conversation)
        second = message_event("thank you", message_id=new_id(), conversation_id=conversation)
        chatwoot.fail_next(10_000, 503)  # Chatwoot is down for the whole first life of the server
        with live_server(settings) as live:
            hook = f"{live.url}/v1/webhooks/chatwoot"
            assert deliver(hook, first, secret=SECRET, delivery_id="r-1").json()["status"] == "accepted"
            assert deliver(hook, second, secret=SECRET, delivery_id="r-2").json()["status"] == "accepted"
            assert chatwoot.wait_for(lambda: len(chatwoot.received(ok_only=False)) >= 3)
        assert chatwoot.replies() == []
        chatwoot.clear_failures()  # Chatwoot is back
        with live_server(settings) as live:
            hook = f"{live.url}/v1/webhooks/chatwoot"
            assert chatwoot.wait_for(lambda: len(chatwoot.replies()) == 2, timeout=30)
            # Chatwoot retrying a delivery across our restart is still recognised.
            assert deliver(hook, first, secret=SECRET, delivery_id="r-1").json() == {"status": "duplicate"}
            settle(0.6)
            replies = transcript_replies(live, conversation)
        assert chatwoot.replies(1, conversation) == replies and len(replies) == 2


# ---------------------------------------------------------------------------- configuration


def test_without_a_secret_unsigned_deliveries_are_accepted_with_a_warning(shop_bundle, tmp_path, caplog):
    async def scenario():
        with MockChatwoot(token=TOKEN) as chatwoot:
            settings = make_settings(shop_bundle, tmp_path, chatwoot_url=chatwoot.url, chatwoot_token=TOKEN)
            app = create_app(settings)
            with caplog.at_level(logging.WARNING, logger="supportbot.webhooks"):
                async with asgi_client(app) as http:
                    raw, headers = signed_body(message_event("hello there", message_id=1, conversation_id=1),
                                               secret=None, delivery_id="unsigned-1")
                    response = await http.post("/v1/webhooks/chatwoot", content=raw, headers=headers)
                    assert response.json()["status"] == "accepted"
                    for _ in range(200):
                        if chatwoot.replies(1, 1):
                            break
                        await asyncio.sleep(0.05)
                    assert len(chatwoot.replies(1, 1)) == 1
        assert any("SUPPORTBOT_CHATWOOT_SECRET is not set" in r.getMessage() for r in caplog.records)
        assert all(TOKEN not in r.getMessage() for r in caplog.records)

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_without_chatwoot_settings_the_webhook_answers_503(shop_bundle, tmp_path):
    async def scenario():
        app = create_app(make_settings(shop_bundle, tmp_path))
        async with asgi_client(app) as http:
            raw, headers = signed_body(message_event("hello there", message_id=1, conversation_id=1), secret=None)
            response = await http.post("/v1/webhooks/chatwoot", content=raw, headers=headers)
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "chatwoot_not_configured"
            # What needs no answer is still acknowledged, so Chatwoot does not hand the conversation over.
            raw, headers = signed_body(message_event("hi", message_id=2, conversation_id=1, message_type="outgoing"),
                                       secret=None)
            response = await http.post("/v1/webhooks/chatwoot", content=raw, headers=headers)
            assert response.status_code == 200 and response.json()["status"] == "ignored"

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_while_no_model_can_answer_chatwoot_is_told_to_retry(tmp_path):
    """429, the status Chatwoot retries; after its last try Chatwoot opens the conversation to humans."""

    async def scenario():
        with MockChatwoot(token=TOKEN) as chatwoot:
            settings = make_settings(tmp_path / "no-such-bundle", tmp_path, chatwoot_url=chatwoot.url,
                                     chatwoot_token=TOKEN)
            app = create_app(settings)
            async with asgi_client(app, start=False) as http, app.router.lifespan_context(app):
                assert not await app.state.runtime.wait_ready()
                raw, headers = signed_body(message_event("hello there", message_id=1, conversation_id=1), secret=None)
                response = await http.post("/v1/webhooks/chatwoot", content=raw, headers=headers)
                assert response.status_code == 429 and response.headers["retry-after"]
                assert response.json()["error"]["code"] == "not_ready"
                # Nothing was recorded: the retry is answered once a model is there.
                assert await app.state.webhooks.outbox.seen(["chatwoot:message:1:1"]) is None

    asyncio.run(asyncio.wait_for(scenario(), 60))
