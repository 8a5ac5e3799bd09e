"""Control characters (other than tab, newline, carriage return) are refused at every entry
point, by the one rule in bot.validation: /v1/chat, /v1/classify and the generic webhook answer
422 `invalid_message`; a Chatwoot delivery is acknowledged and handed to a person; the CLI
prints one line. Nothing is classified or stored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from mock_chatwoot import MockChatwoot, deliver, message_event
from serve_helpers import live_server, make_settings

from serve import signing

ROOT = Path(__file__).resolve().parents[1]
WEBHOOK_SECRET = "hygiene-webhook-secret"
CHATWOOT_TOKEN = "hygiene-chatwoot-token"
ADMIN = {"Authorization": "Bearer hygiene-admin-token"}  # reads any transcript
CONTROL = ["\x00\x01", "hi\x1b[2J", "order\x7f", "\x85", "where is\x0bmy order"]


@pytest.fixture(scope="module")
def chatwoot():
    with MockChatwoot(token=CHATWOOT_TOKEN) as mock:
        yield mock


@pytest.fixture(scope="module")
def server(shop_bundle, tmp_path_factory, chatwoot):
    settings = make_settings(shop_bundle, tmp_path_factory.mktemp("hygiene"), webhook_secret=WEBHOOK_SECRET,
                             admin_token="hygiene-admin-token",
                             chatwoot_url=chatwoot.url, chatwoot_token=CHATWOOT_TOKEN,
                             outbox_backoff_base_s=0.05, outbox_backoff_cap_s=0.2)
    with live_server(settings) as live:
        yield live


def refused(response: httpx.Response) -> None:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_message" and "control characters" in error["message"]


def stored(server, session_id: str) -> int:
    response = httpx.get(f"{server.url}/v1/sessions/{session_id}", headers=ADMIN, timeout=10)
    assert response.status_code in (200, 404), response.text
    return len(response.json()["turns"]) if response.status_code == 200 else 0


@pytest.mark.parametrize("text", CONTROL)
def test_chat_refuses_control_characters_and_stores_nothing(server, text):
    session = f"hygiene-{CONTROL.index(text)}"
    refused(httpx.post(f"{server.url}/v1/chat", json={"session_id": session, "message": text}, timeout=30))
    assert stored(server, session) == 0
    assert httpx.post(f"{server.url}/v1/chat", json={"session_id": session, "message": "hi"}, timeout=30).is_success
    assert stored(server, session) == 2  # the clean message and the reply: nothing of the refused one


def test_chat_keeps_ordinary_whitespace(server):
    response = httpx.post(f"{server.url}/v1/chat", json={"session_id": "hygiene-ws",
                                                        "message": "where is my order\n\t#48213\r\n"}, timeout=30)
    assert response.status_code == 200 and "#48213" in response.json()["reply"]


def test_classify_refuses_control_characters_and_names_the_text(server):
    response = httpx.post(f"{server.url}/v1/classify", json={"texts": ["hello", "\x00\x01"]}, timeout=30)
    refused(response)
    assert response.json()["error"]["message"].startswith("texts[1] ")


def test_generic_webhook_refuses_control_characters(server):
    body = {"conversation_id": "hygiene-g1", "message_id": "m1", "text": "\x00\x01"}
    raw = json.dumps(body).encode()
    headers = {"Content-Type": "application/json",
               **signing.sign(WEBHOOK_SECRET, raw, signing.SUPPORTBOT, delivery_id="hygiene-d1")}
    refused(httpx.post(f"{server.url}/v1/webhooks/generic", content=raw, headers=headers, timeout=30))
    assert stored(server, "generic:hygiene-g1") == 0


def test_chatwoot_delivery_with_control_characters_is_acknowledged_and_handed_to_a_person(server, chatwoot):
    hook = f"{server.url}/v1/webhooks/chatwoot"
    event = message_event("\x00\x01", message_id=9101, conversation_id=9100)
    response = deliver(hook, event, secret=None)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "handed_off"
    assert chatwoot.wait_for(lambda: [r for r in chatwoot.received("toggle_status") if "/9100/" in r.path])
    assert chatwoot.replies(1, 9100) == []  # the bot said nothing
    assert stored(server, "chatwoot:1:9100") == 0  # the text was neither classified nor stored
    assert deliver(hook, event, secret=None).json() == {"status": "duplicate"}  # a retry changes nothing
    later = deliver(hook, message_event("where is my order", message_id=9102, conversation_id=9100), secret=None)
    assert later.status_code == 200 and later.json()["action"] == "handoff"  # a person has it now: silent


def supportbot(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supportbot.cli", *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_predict_refuses_control_characters_in_one_line(shop_bundle):
    for args, stdin in (([str(shop_bundle), "hello", "hi\x1b[2J"], None), ([str(shop_bundle), "-"], "hello\n\x00\x01\n")):
        run = supportbot("predict", "--model", *args, stdin=stdin)
        assert run.returncode == 2 and run.stdout == ""
        assert run.stderr.count("\n") == 1 and "control characters" in run.stderr and "Traceback" not in run.stderr


def test_terminal_chat_refuses_control_characters_and_goes_on(shop_bundle, tmp_path):
    env = dict(os.environ, SUPPORTBOT_DATA_DIR=str(tmp_path), PYTHONUNBUFFERED="1", TERM="dumb")
    run = subprocess.run([sys.executable, "-m", "supportbot.cli", "chat", "--model", str(shop_bundle),
                          "--session", "hygiene"], input="\x01\x02 hello\nthanks\n/transcript\n",
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    assert "(message holds control characters" in run.stdout
    assert "user: thanks" in run.stdout and "\x01" not in run.stdout  # only the clean message was stored
