"""The generic signed webhook on a real server (loopback) with the real shop model: replies inline
or through a signed callback (received by the mock server's /hooks/), dedupe, refusals, and the
callback guard (allow-list, no internal addresses, checked again when the callback is sent)."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest
from mock_chatwoot import MockChatwoot
from serve_helpers import asgi_client, live_server, make_settings

from serve import signing
from serve.app import create_app
from serve.callbacks import CallbackPolicy, CallbackRefused, system_resolver

SECRET = "generic-webhook-secret"
ADMIN_TOKEN = "generic-admin-token-41e2"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}  # reads webhook transcripts (the chat API may not)

_ids = iter(range(1, 1_000_000))


def new_id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


@pytest.fixture(scope="module")
def receiver():
    """A real HTTP server that records callbacks (the mock Chatwoot's /hooks/ routes)."""
    with MockChatwoot() as mock:
        yield mock


FAST_OUTBOX = {"outbox_backoff_base_s": 0.05, "outbox_backoff_cap_s": 0.2, "outbox_max_attempts": 6,
               "outbox_send_timeout_s": 3.0}


@pytest.fixture(scope="module")
def server(shop_bundle, tmp_path_factory):
    """Callbacks allowed to the loopback receiver only, by an exact allow-list entry."""
    settings = make_settings(shop_bundle, tmp_path_factory.mktemp("generic-webhook"), webhook_secret=SECRET,
                             callback_hosts=["127.0.0.1"], admin_token=ADMIN_TOKEN, **FAST_OUTBOX)
    with live_server(settings) as live:
        yield live


@pytest.fixture(scope="module")
def open_server(shop_bundle, tmp_path_factory):
    """No callback allow-list: any host with public addresses, nothing internal."""
    settings = make_settings(shop_bundle, tmp_path_factory.mktemp("generic-webhook-open"), webhook_secret=SECRET,
                             admin_token=ADMIN_TOKEN, **FAST_OUTBOX)
    with live_server(settings) as live:
        yield live


@pytest.fixture()
def hook(server):
    return f"{server.url}/v1/webhooks/generic"


def post(url: str, body: dict, *, secret: str | None = SECRET, delivery_id: str | None = None,
         timestamp: float | None = None, without: tuple[str, ...] = ()) -> httpx.Response:
    """POST a delivery signed as docs/webhooks.md (The generic webhook, Signature) describes, leaving out the headers named in `without`."""
    raw = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers.update(signing.sign(secret, raw, signing.SUPPORTBOT, delivery_id=delivery_id or new_id("d"),
                                    now=timestamp))
    for header in without:
        del headers[header]
    return httpx.post(url, content=raw, headers=headers, timeout=30)


def test_without_a_callback_the_reply_is_in_the_response(server, hook):
    conversation = new_id("c")
    response = post(hook, {"conversation_id": conversation, "message_id": "m1", "text": "what are your opening hours"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "answered" and body["event"] == "reply"
    assert body["conversation_id"] == conversation and body["in_reply_to"] == "m1"
    reply = body["reply"]
    assert reply["action"] == "answer" and reply["reply"] and reply["intent"]["name"] == "contact_hours"
    assert reply["model_version"] == server.runtime.model_version
    assert reply["session_id"] == f"generic:{conversation}"
    turns = httpx.get(f"{server.url}/v1/sessions/generic:{conversation}", headers=ADMIN).json()["turns"]
    assert [t["text"] for t in turns] == ["what are your opening hours", reply["reply"]]


def test_the_webhook_reply_has_the_same_shape_as_the_chat_reply(server, hook):
    conversation = new_id("c")
    text = "which payment methods do you accept"
    hooked = post(hook, {"conversation_id": conversation, "message_id": "m1", "text": text}).json()["reply"]
    chatted = httpx.post(f"{server.url}/v1/chat", json={"session_id": f"chat-{conversation}", "message": text},
                         timeout=30).json()
    assert set(hooked) == set(chatted)
    for key in ("action", "quick_replies", "handed_off", "silent", "model_version"):
        assert hooked[key] == chatted[key], key
    assert hooked["intent"] == pytest.approx(chatted["intent"], abs=1e-4)  # batches may pad differently
    assert [r["name"] for r in hooked["ranking"]] == [r["name"] for r in chatted["ranking"]]
    assert hooked["reply"] and chatted["reply"]  # the wording may vary per session


def test_a_repeated_message_returns_the_first_reply_without_asking_the_bot_again(server, hook):
    conversation = new_id("c")
    body = {"conversation_id": conversation, "message_id": 77, "text": "do you ship abroad"}
    first = post(hook, body, delivery_id="g-1").json()
    again = post(hook, body, delivery_id="g-1").json()
    other_delivery = post(hook, body, delivery_id="g-2").json()
    assert again == other_delivery == {**first, "status": "duplicate"}
    assert len(httpx.get(f"{server.url}/v1/sessions/generic:{conversation}", headers=ADMIN).json()["turns"]) == 2


def test_with_a_callback_the_reply_arrives_signed_once(server, hook, receiver):
    conversation = new_id("c")
    url = f"{receiver.url}/hooks/{conversation}?tenant=7"
    receiver.fail_next(2, 503, path_contains=f"/hooks/{conversation}")
    response = post(hook, {"conversation_id": conversation, "message_id": "m1", "text": "thank you",
                           "callback_url": url})
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] == "accepted" and accepted["callback_delivery_id"]

    def callbacks(ok_only: bool = True):
        return [r for r in receiver.received("hooks", ok_only=ok_only) if r.path.startswith(f"/hooks/{conversation}")]

    assert receiver.wait_for(lambda: callbacks())
    time.sleep(0.4)
    attempts = callbacks(ok_only=False)
    assert [r.status for r in attempts] == [503, 503, 200]
    assert len({r.headers["x-supportbot-delivery"] for r in attempts}) == 1, "one delivery id across retries"
    [delivered] = callbacks()
    assert delivered.path == f"/hooks/{conversation}?tenant=7"
    assert delivered.headers["x-supportbot-delivery"] == accepted["callback_delivery_id"]
    assert signing.verify(SECRET, httpx.Headers(delivered.headers), delivered.body, signing.SUPPORTBOT) is None
    payload = delivered.json
    assert payload["event"] == "reply" and payload["conversation_id"] == conversation
    assert payload["in_reply_to"] == "m1" and payload["reply"]["reply"]
    turns = httpx.get(f"{server.url}/v1/sessions/generic:{conversation}", headers=ADMIN).json()["turns"]
    assert turns[-1]["text"] == payload["reply"]["reply"]


def test_callbacks_of_one_conversation_arrive_in_order(server, hook, receiver):
    conversation = new_id("c")
    url = f"{receiver.url}/hooks/{conversation}"
    receiver.fail_next(3, 500, path_contains=f"/hooks/{conversation}")
    texts = ["hello there", "what are your opening hours", "which payment methods do you accept", "thank you"]
    for number, text in enumerate(texts):
        body = {"conversation_id": conversation, "message_id": f"m{number}", "text": text, "callback_url": url}
        assert post(hook, body).status_code == 202
    assert receiver.wait_for(lambda: len(receiver.received("hooks")) >= 1 and len(
        [r for r in receiver.received("hooks") if r.path == f"/hooks/{conversation}"]) == 4)
    got = [r.json["in_reply_to"] for r in receiver.received("hooks") if r.path == f"/hooks/{conversation}"]
    assert got == ["m0", "m1", "m2", "m3"]


def test_handoff_and_resolved_events(server, hook):
    conversation = new_id("c")
    handoff = post(hook, {"conversation_id": conversation, "message_id": "m1",
                          "text": "I want to talk to a human agent"}).json()
    assert handoff["reply"]["action"] == "handoff" and handoff["reply"]["handed_off"] is True
    silent = post(hook, {"conversation_id": conversation, "message_id": "m2", "text": "hello?"}).json()
    assert silent["reply"]["silent"] is True and silent["reply"]["reply"] == ""
    assert post(hook, {"event": "resolved", "conversation_id": conversation}).json() == {
        "status": "accepted", "event": "resolved"}
    fresh = post(hook, {"conversation_id": conversation, "message_id": "m3", "text": "thank you"}).json()
    assert fresh["reply"]["silent"] is False and fresh["reply"]["reply"]
    assert post(hook, {"event": "handoff", "conversation_id": conversation}).json()["event"] == "handoff"
    assert post(hook, {"conversation_id": conversation, "message_id": "m4", "text": "hi"}).json()["reply"]["silent"]
    assert post(hook, {"event": "release", "conversation_id": conversation}).json()["event"] == "release"
    assert not post(hook, {"conversation_id": conversation, "message_id": "m5", "text": "hi"}).json()["reply"]["silent"]


@pytest.mark.parametrize("header, code", [
    (signing.SUPPORTBOT.signature, "missing_signature"),
    (signing.SUPPORTBOT.timestamp, "missing_timestamp"),
])
def test_missing_signature_headers_are_401(server, hook, header, code):
    response = post(hook, {"conversation_id": "c", "message_id": "m", "text": "hi"}, without=(header,))
    assert response.status_code == 401 and response.json()["error"]["code"] == code


def test_refusals(server, hook):
    conversation = new_id("c")
    body = {"conversation_id": conversation, "message_id": "m1", "text": "hi"}
    assert post(hook, body, secret="wrong").status_code == 401
    stale = post(hook, body, timestamp=time.time() - 600)
    assert stale.status_code == 401 and stale.json()["error"]["code"] == "stale_timestamp"
    no_delivery = post(hook, body, without=(signing.SUPPORTBOT.delivery,))
    assert no_delivery.status_code == 400 and no_delivery.json()["error"]["code"] == "missing_delivery_id"
    for bad, where in [
        ({**body, "callback_url": "ftp://example.com/x"}, "callback_url"),
        ({**body, "callback_url": "javascript:alert(1)"}, "callback_url"),
        ({**body, "callback_url": "http://user:pw@example.com/x"}, "callback_url"),
        ({**body, "callback_url": "/relative/path"}, "callback_url"),
        ({**body, "conversation_id": "has spaces"}, "conversation_id"),
        ({**body, "conversation_id": "x" * 101}, "conversation_id"),
        ({"message_id": "m", "text": "hi"}, "conversation_id"),
        ({**body, "event": "explode"}, "event"),
    ]:
        response = post(hook, bad)
        assert response.status_code == 422, (bad, response.text)
        assert response.json()["error"]["code"] == "invalid_request" and where in response.json()["error"]["message"]
    assert post(hook, {"conversation_id": conversation, "message_id": "m1"}).status_code == 422
    assert post(hook, {**body, "text": "   "}).status_code == 422
    too_long = post(hook, {**body, "text": "x" * 5000})
    assert too_long.status_code == 422 and too_long.json()["error"]["code"] == "message_too_long"
    raw = b"{not json"
    headers = {**signing.sign(SECRET, raw, signing.SUPPORTBOT), "Content-Type": "application/json"}
    response = httpx.post(hook, content=raw, headers=headers)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    # Nothing refused was recorded: the valid delivery of the same message is answered now.
    assert post(hook, body).json()["status"] == "answered"


def test_without_a_secret_the_generic_webhook_refuses(shop_bundle, tmp_path):
    async def scenario():
        app = create_app(make_settings(shop_bundle, tmp_path))
        async with asgi_client(app) as http:
            raw = json.dumps({"conversation_id": "c", "message_id": "m", "text": "hi"}).encode()
            response = await http.post("/v1/webhooks/generic", content=raw,
                                       headers={"Content-Type": "application/json", "X-Supportbot-Delivery": "d"})
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "webhook_not_configured"

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_openapi_describes_the_webhooks(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    generic = schema["paths"]["/v1/webhooks/generic"]["post"]
    body = generic["requestBody"]["content"]["application/json"]["schema"]
    assert {"conversation_id", "message_id", "text", "callback_url", "event"} <= set(body["properties"])
    assert {"200", "202", "401", "422", "429", "503"} <= set(generic["responses"])
    assert "/v1/webhooks/chatwoot" in schema["paths"]


# ----------------------------------------------------------------------------- the callback guard


def receiver_port(receiver) -> int:
    return int(receiver.url.rsplit(":", 1)[1])


def sent_to(receiver, conversation: str) -> list:
    return [r for r in receiver.received("hooks", ok_only=False) if r.path.startswith(f"/hooks/{conversation}")]


def callback_actions(server, conversation: str) -> list[dict]:
    actions = server.app.state.webhooks.outbox.store.actions()
    return [a for a in actions if a["conversation"] == f"generic:{conversation}"]


def test_a_callback_host_off_the_allow_list_is_refused_and_nothing_is_queued(server, hook, receiver, caplog):
    conversation = new_id("c")
    port = receiver_port(receiver)
    body = {"conversation_id": conversation, "message_id": "m1", "text": "thank you"}
    with caplog.at_level(logging.WARNING):
        for url, host in [
            ("https://hooks.evil.example/cb?token=s3cret-token", "hooks.evil.example"),
            (f"http://localhost:{port}/hooks/{conversation}?token=s3cret-token", "localhost"),
            (f"http://[::1]:{port}/hooks/{conversation}", "::1"),
            (f"http://127.0.0.2:{port}/hooks/{conversation}", "127.0.0.2"),
            (f"http://127.1:{port}/hooks/{conversation}", "127.1"),
        ]:
            response = post(hook, {**body, "callback_url": url})
            assert response.status_code == 422, (url, response.text)
            assert response.json()["error"] == {
                "code": "callback_not_allowed",
                "message": f"callback_url: host {host!r} is not in the callback allow-list (SUPPORTBOT_CALLBACK_HOSTS)"}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "'hooks.evil.example' is not in the callback allow-list" in logged and "s3cret-token" not in logged
    # Nothing was recorded, asked of the bot or sent; the same message with an allowed URL is new.
    assert httpx.get(f"{server.url}/v1/sessions/generic:{conversation}", headers=ADMIN).status_code == 404
    assert callback_actions(server, conversation) == [] and sent_to(receiver, conversation) == []
    accepted = post(hook, {**body, "callback_url": f"{receiver.url}/hooks/{conversation}"})
    assert accepted.status_code == 202 and accepted.json()["status"] == "accepted"
    assert receiver.wait_for(lambda: [r.status for r in sent_to(receiver, conversation)] == [200])
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'supportbot_webhook_deliveries_total{outcome="callback_refused",platform="generic"} 5.0' in metrics


def test_without_an_allow_list_internal_addresses_are_refused(open_server, receiver):
    conversation = new_id("c")
    port = receiver_port(receiver)
    hook = f"{open_server.url}/v1/webhooks/generic"
    body = {"conversation_id": conversation, "message_id": "m1", "text": "thank you"}
    for url, host, kind in [
        (f"http://127.0.0.1:{port}/hooks/{conversation}", "127.0.0.1", "loopback"),
        ("http://[::1]/", "::1", "loopback"),
        ("http://10.0.0.5/", "10.0.0.5", "private"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254", "link-local"),
        ("http://[fe80::1]/", "fe80::1", "link-local"),
        ("http://0.0.0.0/", "0.0.0.0", "unspecified"),
        ("http://224.0.0.1/", "224.0.0.1", "multicast"),
        ("http://100.64.0.1/", "100.64.0.1", "non-public"),
        ("http://[::ffff:127.0.0.1]/", "::ffff:7f00:1", "loopback"),
        (f"http://2130706433:{port}/hooks/{conversation}", "2130706433", "loopback"),
    ]:
        response = post(hook, {**body, "callback_url": url})
        assert response.status_code == 422, (url, response.text)
        error = response.json()["error"]
        assert error["code"] == "callback_not_allowed"
        assert error["message"].startswith(f"callback_url: host {host!r} is not a public address ({kind})"), url
    response = post(hook, {**body, "callback_url": f"http://LocalHost.:{port}/hooks/{conversation}"})
    assert response.status_code == 422 and "host 'localhost' is this machine" in response.json()["error"]["message"]
    assert httpx.get(f"{open_server.url}/v1/sessions/generic:{conversation}", headers=ADMIN).status_code == 404
    assert callback_actions(open_server, conversation) == [] and sent_to(receiver, conversation) == []


def _refused_when_sent(server, receiver, conversation: str, host: str, caplog) -> dict:
    """POST a message whose callback_url names `host` (accepted: it looks public), then the stored
    outcome of its callback once the outbox has tried it."""
    hook = f"{server.url}/v1/webhooks/generic"
    url = f"http://{host}:{receiver_port(receiver)}/hooks/{conversation}?token=s3cret-token"
    with caplog.at_level(logging.WARNING):
        response = post(hook, {"conversation_id": conversation, "message_id": "m1", "text": "thank you",
                               "callback_url": url})
        assert response.status_code == 202, response.text
        deadline = time.monotonic() + 15
        while [a["state"] for a in callback_actions(server, conversation)] != ["failed"]:
            assert time.monotonic() < deadline, callback_actions(server, conversation)
            time.sleep(0.02)
        time.sleep(0.5)  # more than the longest backoff: a retry would have happened by now
    [action] = callback_actions(server, conversation)
    assert action["state"] == "failed" and action["attempts"] == 1, action
    assert sent_to(receiver, conversation) == []
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"callback refused at send time: host {host!r} resolves to" in logged
    assert "s3cret-token" not in logged and "/hooks/" not in logged
    return action


def test_a_name_that_resolves_to_loopback_is_refused_when_the_callback_is_sent(open_server, receiver, monkeypatch,
                                                                               caplog):
    """DNS rebinding: the name looks public when the delivery arrives and points at 127.0.0.1 when
    the callback goes out. One internal address among public ones is enough to refuse."""
    async def rebinding(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "127.0.0.1"] if host == "rebind.test" else await system_resolver(host, port)

    monkeypatch.setattr(open_server.app.state.webhooks.callback_policy, "resolver", rebinding)
    action = _refused_when_sent(open_server, receiver, new_id("c"), "rebind.test", caplog)
    assert action["last_error"].startswith("CallbackRefused: host 'rebind.test' resolves to 127.0.0.1 (loopback)")
    text = httpx.get(f"{open_server.url}/metrics").text
    assert 'supportbot_outbox_failed_total{kind="generic.callback"}' in text


def test_the_callback_policy_rules():
    open_policy = CallbackPolicy()
    assert not open_policy.restricted
    assert open_policy.check_url("https://hooks.example.com/cb") == "hooks.example.com"
    assert open_policy.check_url("http://[2001:4860:4860::8888]/") == "2001:4860:4860::8888"
    for url in ("http://[64:ff9b::a00:5]/", "http://[2002:7f00:1::]/", "http://0x7f.1/", "http://[::]/",
                "http://a.localhost/", "http://255.255.255.255/"):
        with pytest.raises(CallbackRefused):
            open_policy.check_url(url)
    assert open_policy.check_url("https://exämple.com/") == "xn--exmple-cua.com"  # IDNA, as it is sent
    # never deliverable, so refused at intake rather than retried for hours
    for url, why in (("http://1.2.3.4.5/", "not a valid host name"), ("http://exa mple.com/", "not a valid host name"),
                     ("http://-a.com/", "not a valid host name"), ("http://a..b/", "not a valid host name"),
                     ("http://" + "a" * 64 + ".com/", "not a valid host name"),
                     ("http://example.com:99999/", "port 99999"), ("http://example.com:0/", "port 0")):
        with pytest.raises(CallbackRefused, match=why):
            open_policy.check_url(url)
    policy = CallbackPolicy(["Hooks.Example.com", ".example.org", "10.0.0.7"])
    assert policy.restricted
    assert policy.check_url("https://hooks.example.com./x") == "hooks.example.com"
    assert policy.check_url("https://a.b.example.org/") == "a.b.example.org"
    assert policy.check_url("http://10.0.0.7:8080/") == "10.0.0.7"
    assert policy.trusted("10.0.0.7") and policy.trusted("hooks.example.com")
    assert not policy.trusted("a.example.org")  # a suffix admits names, not their internal addresses
    for url in ("https://example.org/", "https://evil-example.org/", "https://example.org.evil.com/",
                "https://other.example.com/", "http://10.0.0.8/"):
        with pytest.raises(CallbackRefused, match="is not in the callback allow-list"):
            policy.check_url(url)

    async def internal(host: str, port: int) -> list[str]:
        return ["10.1.2.3"]

    guarded = CallbackPolicy([".example.org", "hooks.example.com"], resolver=internal)
    with pytest.raises(CallbackRefused, match=r"'a.example.org' resolves to 10.1.2.3 \(private\)"):
        asyncio.run(guarded.addresses("a.example.org", 443))
    assert asyncio.run(guarded.addresses("hooks.example.com", 443)) is None  # exact: trusted, connect by name
