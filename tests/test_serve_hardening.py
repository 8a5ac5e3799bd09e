"""The service under an outside probe (issue 13) on a real server on loopback with the real shop model:
bad input never 500s, bounded metrics and connections, no Host-built redirects, HEAD, a port that
answers while the server starts, and a bounded schemathesis run over the whole published schema."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import live_server, make_settings
from test_serve_api import metric_value

from serve import signing

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "hardening-key-0d1e"
ADMIN_TOKEN = "hardening-admin-9a2b"
WEBHOOK_SECRET = "hardening-webhook-77c3"
HEADER_TIMEOUT = 1.0
CLIENT_CHARS = 30_000
KEY = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(shop_bundle, tmp_path_factory):
    settings = make_settings(
        shop_bundle, tmp_path_factory.mktemp("serve-hardening"), api_key=API_KEY, admin_token=ADMIN_TOKEN,
        webhook_secret=WEBHOOK_SECRET, header_timeout_s=HEADER_TIMEOUT, max_client_chars=CLIENT_CHARS,
    )
    with live_server(settings) as live:
        yield live


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield client


def generic(http: httpx.Client, raw: bytes, *, content_type: str = "application/json") -> httpx.Response:
    """POST raw bytes to the generic webhook, correctly signed."""
    headers = {**signing.sign(WEBHOOK_SECRET, raw, signing.SUPPORTBOT), "Content-Type": content_type}
    return http.post("/v1/webhooks/generic", content=raw, headers=headers)


def raw_exchange(server, request: bytes, *, wait: float = 10.0) -> tuple[bytes, float]:
    """Send raw bytes, read until the server closes the connection: (what it answered, seconds it took)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait) as sock:
        sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            pass
    return answer, time.monotonic() - started


# ---------------------------------------------------------------------------- channels and session tokens


def test_with_the_api_key_channel_conversations_stay_with_their_channel(http):
    conversation = f"channel-{time.time_ns()}"
    answered = generic(http, json.dumps({"conversation_id": conversation, "message_id": "m1",
                                         "text": "where is my order"}).encode())
    assert answered.status_code == 200
    for session_id in (f"generic:{conversation}", "chatwoot:1:2001", "web:guessed"):
        written = http.post("/v1/chat", json={"session_id": session_id, "message": "I want to talk to a human"})
        assert written.status_code == 403 and written.json()["error"]["code"] == "session_forbidden"
        assert http.get(f"/v1/sessions/{session_id}").status_code == 403
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    turns = http.get(f"/v1/sessions/generic:{conversation}", headers=admin).json()["turns"]
    assert [t["role"] for t in turns] == ["user", "bot"]  # the customer's conversation was not touched
    assert http.post("/v1/chat", json={"message": "hi"}, headers=admin).status_code == 403  # the admin only reads
    # The key's own namespace: any other id, chat and transcript.
    assert http.post("/v1/chat", json={"session_id": "crm-user-17", "message": "hi"}).status_code == 200
    assert http.get("/v1/sessions/crm-user-17").status_code == 200


def test_a_web_session_token_opens_its_own_conversation_and_nothing_else(server):
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        minted = anonymous.post("/v1/web/session")  # no key needed: the page's public door
        assert minted.status_code == 200
        body = minted.json()
        session_id, token = body["session_id"], body["token"]
        assert session_id.startswith("web:") and body["expires_in"] == 86400 and body["expires_at"] > time.time()
        bearer = {"Authorization": f"Bearer {token}"}
        chat = anonymous.post("/v1/chat", json={"message": "where is my order #48213"}, headers=bearer)
        assert chat.status_code == 200 and chat.json()["session_id"] == session_id
        assert anonymous.post("/v1/chat", json={"session_id": session_id, "message": "thanks"},
                              headers=bearer).status_code == 200
        assert len(anonymous.get(f"/v1/sessions/{session_id}", headers=bearer).json()["turns"]) == 4
        # Nothing else: another session, the key's namespace, classify.
        other = anonymous.post("/v1/chat", json={"session_id": "crm-user-17", "message": "hi"}, headers=bearer)
        assert other.status_code == 403 and other.json()["error"]["code"] == "session_forbidden"
        assert anonymous.get("/v1/sessions/crm-user-17", headers=bearer).status_code == 403
        assert anonymous.post("/v1/classify", json={"texts": ["hi"]}, headers=bearer).status_code == 403
        # No credential, a forged or tampered token: refused.
        assert anonymous.post("/v1/chat", json={"message": "hi"}).status_code == 401
        assert anonymous.get(f"/v1/sessions/{session_id}").status_code == 401
        forged = token.rsplit(".", 1)[0] + ".AAAA"
        moved = token.replace(session_id, "web:someone-else")
        for bad in (forged, moved, token + "x", "sbt1.web:x.99999999999.sig"):
            refused = anonymous.post("/v1/chat", json={"message": "hi"}, headers={"Authorization": f"Bearer {bad}"})
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "session_expired"
        # Renewed while valid: the same conversation.
        renewed = anonymous.post("/v1/web/session", headers=bearer).json()
        assert renewed["session_id"] == session_id


def test_session_tokens_expire_and_are_bound_to_their_secret():
    from serve.access import SessionTokens

    now = [1_000_000.0]
    tokens = SessionTokens(b"k" * 32, 60, clock=lambda: now[0])
    token, session_id, expires = tokens.mint()
    assert tokens.verify(token) == session_id and expires == 1_000_060
    assert SessionTokens(b"j" * 32, 60, clock=lambda: now[0]).verify(token) is None  # another secret
    now[0] += 61
    assert tokens.verify(token) is None  # expired
    assert tokens.verify(tokens.mint("web:kept")[0]) == "web:kept"
    assert tokens.verify(tokens.mint("crm-user-17")[0]) is None  # a token is only ever for a web: session


# ---------------------------------------------------------------------------- bad input never 500s

DEEP = b"[" * 1000 + b"]" * 1000


def test_deeply_nested_json_on_the_webhooks_is_a_400_not_a_500(http):
    chatwoot = http.post("/v1/webhooks/chatwoot", content=DEEP, headers={"Content-Type": "application/json"})
    assert chatwoot.status_code == 400, chatwoot.text
    assert chatwoot.json()["error"]["code"] == "invalid_json" and "Traceback" not in chatwoot.text
    response = generic(http, b'{"conversation_id": "deep", "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_deeply_nested_metadata_in_chat_is_refused_or_kept_never_a_500(http):
    for depth in (900, 5000):
        raw = b'{"message": "hi", "metadata": {"k": ' + b"[" * depth + b"]" * depth + b"}}"
        response = http.post("/v1/chat", content=raw, headers={"Content-Type": "application/json"})
        assert 200 <= response.status_code < 500, (depth, response.status_code, response.text[:200])
        if response.status_code == 200:
            assert http.get(f"/v1/sessions/{response.json()['session_id']}").status_code == 200


def test_a_lone_surrogate_in_generic_metadata_is_refused_and_the_transcript_stays_readable(http):
    conversation = f"surrogate-{time.time_ns()}"
    first = generic(http, json.dumps({"conversation_id": conversation, "message_id": "m1",
                                      "text": "where is my order"}).encode())
    assert first.status_code == 200, first.text
    bad = b'{"conversation_id": "%s", "message_id": "m2", "text": "hi", "metadata": {"k": "\\ud800"}}' % (
        conversation.encode())
    refused = generic(http, bad)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_request"
    transcript = http.get(f"/v1/sessions/generic:{conversation}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert transcript.status_code == 200, transcript.text
    assert [turn["role"] for turn in transcript.json()["turns"]] == ["user", "bot"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""])
def test_the_webhooks_refuse_bodies_that_are_not_json_with_415(http, content_type):
    raw = json.dumps({"conversation_id": "cross-site", "message_id": "m1", "text": "talk to a human"}).encode()
    response = generic(http, raw, content_type=content_type)
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"
    response = http.post("/v1/webhooks/chatwoot", content=b'{"event": "message_created"}',
                         headers={"Content-Type": content_type})
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"
    assert generic(http, raw, content_type="application/json; charset=utf-8").status_code == 200


def test_the_schema_states_what_the_server_refuses(http):
    components = http.get("/openapi.json").json()["components"]["schemas"]
    message = components["ChatRequest"]["properties"]["message"]
    assert message["minLength"] == 1 and message["pattern"] == r"\S"
    items = components["ClassifyRequest"]["properties"]["texts"]["items"]
    assert items["minLength"] == 1 and items["pattern"] == r"\S" and items["maxLength"] == 2000
    for blank in ("", "   ", "\n\t"):
        refused = http.post("/v1/classify", json={"texts": ["ok", blank]})
        assert refused.status_code == 422, blank


def test_schemathesis_finds_no_server_error_and_no_schema_violation(server, tmp_path):
    """A bounded run of schemathesis over every operation of the published schema, with the API key."""
    command = [
        str(Path(sys.executable).with_name("schemathesis")), "run", f"{server.url}/openapi.json",
        "--header", f"Authorization: Bearer {API_KEY}",
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                    "response_schema_conformance",
        "--phases", "examples,coverage,fuzzing", "--max-examples", "10", "--max-time", "30", "--seed", "13",
        "--workers", "1", "--request-timeout", "20", "--no-color", "--warnings", "off",
    ]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=90, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "5xx" not in output.split("SUMMARY")[-1] or "0 5xx" in output
    assert time.monotonic() - started < 60


# ---------------------------------------------------------------------------- fair queues


def long_texts(count: int, chars: int = 1990) -> list[str]:
    return [(f"case {i}: " + "my parcel never arrived and nobody answers the phone, " * 40)[:chars] for i in range(count)]


def test_a_chat_message_does_not_wait_behind_bulk_classify(server):
    """A classify request of long texts runs in chunks, and a chat message goes before the next chunk.

    The chat is sent once the server has run the bulk request's first chunk (seen in /metrics), not
    after a fixed sleep: on a quiet machine a sleep let the whole request finish first."""
    texts = long_texts(50)  # 99,500 characters: 25 chunks, the most one request may send

    async def scenario() -> tuple[httpx.Response, httpx.Response, bool]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300, headers=KEY) as client:
            assert (await client.post("/v1/chat", json={"message": "hello"})).status_code == 200  # warm
            passes = metric_value((await client.get("/metrics")).text, "supportbot_batch_size_count")
            bulk = asyncio.create_task(client.post("/v1/classify", json={"texts": texts}))
            while metric_value((await client.get("/metrics")).text, "supportbot_batch_size_count") == passes:
                assert not bulk.done(), bulk.result().text
                await asyncio.sleep(0.005)
            chat = await client.post("/v1/chat", json={"message": "where is my order #48213"})
            bulk_still_running = not bulk.done()  # in one queue the chat would come after every chunk
            return chat, await bulk, bulk_still_running

    chat, classified, bulk_still_running = asyncio.run(scenario())
    assert chat.status_code == 200 and classified.status_code == 200
    assert len(classified.json()["predictions"]) == 50
    assert bulk_still_running, "the chat message was answered only after the whole classify request"


def test_a_classify_request_and_a_client_are_bounded_in_characters(server, http):
    too_much = http.post("/v1/classify", json={"texts": long_texts(60, 1999)})  # 119,940 > 100,000 characters
    assert too_much.status_code == 422 and too_much.json()["error"]["code"] == "too_much_text"
    assert "119,940 characters; the limit is 100,000" in too_much.json()["error"]["message"]

    async def three_at_once() -> list[httpx.Response]:  # 20,000 characters each; the client may hold 30,000
        async with httpx.AsyncClient(base_url=server.url, timeout=300, headers=KEY) as client:
            return await asyncio.gather(*[client.post("/v1/classify", json={"texts": long_texts(20, 1000)})
                                          for _ in range(3)])

    statuses = sorted(r.status_code for r in asyncio.run(three_at_once()))
    assert statuses == [200, 429, 429], statuses
    assert http.post("/v1/classify", json={"texts": long_texts(20, 1000)}).status_code == 200  # budget released


# ---------------------------------------------------------------------------- bounded resources


def test_invented_http_methods_are_counted_as_other(server, http):
    for i in range(40):
        response = http.request(f"PROBE{i}", "/healthz")
        assert response.status_code == 405
    text = http.get("/metrics").text
    assert "PROBE" not in text
    assert metric_value(text, "supportbot_http_requests_total", method="other", route="/healthz", status="405") >= 40


def test_a_half_sent_request_is_dropped_after_the_header_timeout(server):
    answer, seconds = raw_exchange(server, b"GET /healthz HTTP/1.1\r\nHost: probe\r\nX-Slow: 1\r\n")
    assert answer == b"" and HEADER_TIMEOUT * 0.8 <= seconds < HEADER_TIMEOUT + 4, seconds
    answer, seconds = raw_exchange(server, b"")  # connects and says nothing
    assert answer == b"" and seconds < HEADER_TIMEOUT + 4, seconds
    # Headers that do arrive in time are answered (the timer covers the headers, not the answer).
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        time.sleep(HEADER_TIMEOUT / 3)
        sock.sendall(b"Host: probe\r\nConnection: close\r\n\r\n")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_a_client_that_disconnects_mid_request_is_not_a_500(server, http, caplog):
    caplog.set_level(logging.INFO)
    for path in (b"/v1/chat", b"/v1/webhooks/chatwoot"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST %s HTTP/1.1\r\nHost: probe\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\nAuthorization: Bearer %s\r\n\r\n{\"message\": " % (
                             path, API_KEY.encode()))
            time.sleep(0.2)
    deadline = time.monotonic() + 10
    while True:
        text = http.get("/metrics").text
        if metric_value(text, "supportbot_http_requests_total", status="499") >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert metric_value(text, "supportbot_http_requests_total", status="499") >= 2
    assert metric_value(text, "supportbot_http_requests_total", status="500") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if getattr(r, "status", None) == 500]


# ---------------------------------------------------------------------------- small ones


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/"])
def test_head_answers_like_get_without_a_body(http, path):
    head, get = http.head(path), http.get(path)
    assert head.status_code == get.status_code == 200
    assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]


def test_no_redirect_is_built_from_the_host_header(http):
    for path in ("/v1/sessions/abc/", "/healthz/", "/docs/"):
        response = http.get(path, headers={"Host": "evil.example"}, follow_redirects=False)
        assert not response.is_redirect and "location" not in response.headers, (path, response.headers)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_supportbot_serve_answers_not_ready_from_the_moment_its_port_is_bound(shop_bundle, tmp_path):
    """Connections during start-up are answered 503 `not_ready` (webhooks: 429, which Chatwoot retries),
    never refused: the port is bound before torch and the model are even imported."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("wb")
    env = {**os.environ, "SUPPORTBOT_DATA_DIR": str(tmp_path / "data"), "SUPPORTBOT_LOG_LEVEL": "warning"}
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from supportbot.cli import main; sys.exit(main(sys.argv[1:]))",
         "serve", "--model", str(shop_bundle), "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    answers: list[dict] = []
    early: list[tuple[int, str, str | None]] = []
    try:
        deadline = time.monotonic() + 240
        with httpx.Client(base_url=url, timeout=10) as client:
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    ready = client.get("/readyz")
                except httpx.TransportError:
                    time.sleep(0.01)
                    continue
                answers.append(ready.json())
                if ready.status_code == 200:
                    break
                if not early and answers[-1]["detail"] == "the server is starting":
                    chat = client.post("/v1/chat", json={"message": "hi"})
                    hook = client.post("/v1/webhooks/chatwoot", json={"event": "message_created"})
                    if client.get("/readyz").json()["detail"] == "the server is starting":  # both answered early
                        early += [(chat.status_code, chat.json()["error"]["code"], chat.headers.get("retry-after")),
                                  (hook.status_code, hook.json()["error"]["code"], hook.headers.get("retry-after"))]
                time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()
    assert answers, (tmp_path / "serve.log").read_text()[-3000:]
    assert answers[0] == {"ready": False, "status": "loading", "model_version": None,
                          "detail": "the server is starting"}, answers[0]
    assert answers[-1]["ready"] is True
    assert early == [(503, "not_ready", "1"), (429, "not_ready", "1")], early
    # uvicorn ends by re-raising the SIGTERM it handled, after its graceful shutdown
    assert process.returncode in (0, -15), (tmp_path / "serve.log").read_text()[-3000:]
