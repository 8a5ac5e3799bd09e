"""Knowledge answers everywhere a reply goes, on a real server (loopback) with a real bundle: the chat
API's `sources`, the generic webhook's reply, Chatwoot's message (with a Markdown link), and the web
page in a real headless Chromium (the source shown as a link)."""

from __future__ import annotations

import json

import httpx
import pytest
from mock_chatwoot import MockChatwoot, deliver, message_event
from serve_helpers import live_server, make_settings

from serve import signing

QUESTION = "can I put my wool jumper in the tumble dryer?"
WOOL = {"title": "Caring for wool", "url": "https://help.example.test/articles/wool-care"}
SECRET, TOKEN, WEBHOOK_SECRET = "cw-secret", "cw-token", "generic-secret"


@pytest.fixture(scope="module")
def chatwoot():
    with MockChatwoot(token=TOKEN, secret=SECRET) as mock:
        yield mock


@pytest.fixture(scope="module")
def server(knowledge_bundle, tmp_path_factory, chatwoot):
    settings = make_settings(knowledge_bundle, tmp_path_factory.mktemp("knowledge-serve"), chatwoot_url=chatwoot.url,
                             chatwoot_token=TOKEN, chatwoot_secret=SECRET, webhook_secret=WEBHOOK_SECRET,
                             outbox_backoff_base_s=0.05, outbox_backoff_cap_s=0.2)
    with live_server(settings) as live:
        chatwoot.bot_url = f"{live.url}/v1/webhooks/chatwoot"
        yield live


def test_chat_replies_carry_the_cited_source(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        reply = http.post("/v1/chat", json={"message": QUESTION}).json()
        assert reply["action"] == "knowledge"
        [source] = reply["sources"]
        assert {k: source[k] for k in ("title", "url")} == WOOL and source["passage_id"] == "wool-care#0"
        # the article's retrieval score: a passage's cosine + 0.5 x a known question's + 0.5 x a sentence's
        assert 0 < source["score"] <= 2
        assert reply["quick_replies"] == ["Yes, thanks", "No, not really"]
        helpful = http.post("/v1/chat", json={"session_id": reply["session_id"], "message": "Yes, thanks"}).json()
        assert helpful["sources"] == [] and helpful["action"] == "knowledge"
        plain = http.post("/v1/chat", json={"message": "where is my order #48213"}).json()
        assert plain["action"] == "answer" and plain["sources"] == []
        turns = server.runtime.chatbot.transcript(reply["session_id"])  # the store, as the transcript route reads it
        assert turns[1]["metadata"]["sources"][0]["url"] == WOOL["url"]
        assert turns[2]["metadata"]["feedback"] == {"helpful": True, "passage_id": "wool-care#0"}
        schema = http.get("/openapi.json").json()["components"]["schemas"]
        action = schema["ChatResponse"]["properties"]["action"]
        assert "knowledge" in (action.get("enum") or schema[action["$ref"].rsplit("/", 1)[1]]["enum"])
        assert "sources" in schema["ChatResponse"]["properties"]


def test_the_generic_webhook_reply_includes_the_link(server):
    body = json.dumps({"conversation_id": "kc-1", "message_id": "m1", "text": QUESTION}).encode()
    headers = {"Content-Type": "application/json",
               **signing.sign(WEBHOOK_SECRET, body, signing.SUPPORTBOT, delivery_id="kd-1")}
    response = httpx.post(f"{server.url}/v1/webhooks/generic", content=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    reply = response.json()["reply"]
    assert reply["action"] == "knowledge"
    assert [{k: s[k] for k in ("title", "url")} for s in reply["sources"]] == [WOOL]


def test_the_chatwoot_message_includes_the_link(server, chatwoot):
    hook = f"{server.url}/v1/webhooks/chatwoot"
    response = deliver(hook, message_event(QUESTION, message_id=9001, conversation_id=9002), secret=SECRET)
    assert response.status_code == 200, response.text
    assert response.json()["action"] == "knowledge"
    assert chatwoot.wait_for(lambda: chatwoot.replies(1, 9002))
    [content] = chatwoot.replies(1, 9002)
    assert content.endswith(f"[{WOOL['title']}]({WOOL['url']})")


@pytest.mark.browser
def test_the_web_page_shows_the_source_as_a_link(server, browser):
    page = browser.new_page()
    page.goto(server.url + "/")
    box = page.get_by_label("Your message")
    box.fill(QUESTION)
    box.press("Enter")
    link = page.locator("li.message.bot a.source")
    link.wait_for()
    assert link.inner_text() == WOOL["title"] and link.get_attribute("href") == WOOL["url"]
    assert link.get_attribute("rel") == "noopener noreferrer"
    assert page.get_by_role("link", name=WOOL["title"]).is_visible()
    page.reload()  # the transcript brings the link back
    page.locator("li.message.bot a.source").wait_for()
    assert page.locator("li.message.bot a.source").get_attribute("href") == WOOL["url"]
