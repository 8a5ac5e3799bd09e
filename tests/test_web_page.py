"""The web chat page in a real headless Chromium against a live server with the real shop model and
SUPPORTBOT_API_KEY set: send a message, see the reply, click a clarify quick reply, see the handoff
state, reload; the page works on its own session token and the API key never reaches the browser."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
import yaml
from serve_helpers import live_server, make_settings

from bot import bundle as bundle_mod

pytestmark = pytest.mark.browser

SHOP_TEST = Path(__file__).resolve().parents[1] / "bot" / "domains" / "shop" / "test.yaml"
API_KEY = "web-page-api-key-5f3a91"
AMBIGUOUS = ["blah", "ta", "ok", "hmm", "what should I call you", "yes", "help", "order", "card", "bye then"]


@pytest.fixture(scope="module")
def cautious_bundle(shop_bundle, tmp_path_factory) -> Path:
    """The shop model with a wide ambiguity gap: it asks "did you mean A or B?" whenever two intents
    are close, as an operator who prefers questions to wrong answers would set it."""
    source = bundle_mod.load(shop_bundle)
    meta = {k: v for k, v in source.meta.items() if k not in ("format_version", "version", "created", "files")}
    meta["calibration"] = {**meta["calibration"], "ambiguity_gap": 0.9}
    writers = {name: (lambda target, name=name: shutil.copyfile(source.path / name, target)) for name in source.meta["files"]}
    return bundle_mod.write(tmp_path_factory.mktemp("bundles") / "shop-cautious", meta, writers).path


@pytest.fixture(scope="module")
def server(cautious_bundle, tmp_path_factory):
    settings = make_settings(cautious_bundle, tmp_path_factory.mktemp("web-page"), api_key=API_KEY)
    with live_server(settings) as live:
        yield live




def clarify_message(url: str) -> tuple[str, list[str]]:
    """A message this model answers with a clarify question (asked on a fresh session each)."""
    pack = yaml.safe_load(SHOP_TEST.read_text())
    candidates = AMBIGUOUS + [t for spec in pack["intents"].values() for t in spec["examples"]]
    candidates += list(pack.get("out_of_scope") or [])
    with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        for i, text in enumerate(candidates):
            reply = http.post("/v1/chat", json={"session_id": f"probe-{i}", "message": text}).json()
            if reply["action"] == "clarify" and reply["quick_replies"]:
                return text, reply["quick_replies"]
    pytest.fail("no message of the shop test set gets a clarify reply from this model")


def stored_session(page) -> dict | None:
    return page.evaluate("JSON.parse(localStorage.getItem('supportbot.web_session'))")


def test_chat_page_conversation(server, browser):
    clarify_text, options = clarify_message(server.url)
    assert httpx.post(f"{server.url}/v1/chat", json={"message": "hi"}).status_code == 401  # the key is required
    page = browser.new_page()
    sent: list[dict[str, str]] = []
    page.on("request", lambda request: sent.append({"url": request.url, **request.headers}))
    page.goto(server.url + "/")

    log = page.get_by_role("log", name="Conversation")
    assert log.get_attribute("aria-live") == "polite"
    box = page.get_by_label("Your message")
    assert page.get_by_role("heading", name="Customer support").is_visible()

    # Send with the keyboard: type, Enter.
    box.fill("where is my order #48213")
    box.press("Enter")
    bot = log.locator("li.message.bot")
    bot.first.wait_for()
    assert "48213" in bot.first.inner_text()
    assert log.locator("li.message.user").first.inner_text().endswith("where is my order #48213")
    assert box.input_value() == ""
    stored = stored_session(page)
    session_id, token = stored["session_id"], stored["token"]
    assert session_id.startswith("web:") and token.startswith("sbt1.")

    # A clarify question shows its options as buttons; clicking one sends it.
    box.fill(clarify_text)
    page.get_by_role("button", name="Send").click()
    group = page.get_by_role("group", name="Suggested replies")
    choice = group.get_by_role("button", name=options[0], exact=True)
    choice.wait_for()
    assert [b.inner_text() for b in group.get_by_role("button").all()] == options
    answers_before = bot.count()
    choice.click()
    page.wait_for_function(f"document.querySelectorAll('li.message.bot').length > {answers_before}")
    assert log.locator("li.message.user").last.inner_text().endswith(options[0])
    assert page.evaluate("document.activeElement.id") == "message"  # focus back in the box

    # Asking for a person: the page shows that a person will take over.
    handoff = page.get_by_role("status").filter(has_text="A person will take over")
    assert not handoff.is_visible()
    box.fill("I want to talk to a human")
    box.press("Enter")
    handoff.wait_for(state="visible")
    turns = log.locator("li.message").count()

    # A reload keeps the session: same id, transcript back, still handed off.
    page.reload()
    page.wait_for_function(f"document.querySelectorAll('li.message').length === {turns}")
    assert stored_session(page)["session_id"] == session_id
    assert page.get_by_role("status").filter(has_text="A person will take over").is_visible()
    transcript = httpx.get(f"{server.url}/v1/sessions/{session_id}", headers={"Authorization": f"Bearer {token}"})
    assert len(transcript.json()["turns"]) == turns and transcript.json()["turns"][0]["text"] == "where is my order #48213"
    # The page's token reads its own conversation and nothing else; no transcript is public.
    assert httpx.get(f"{server.url}/v1/sessions/{session_id}").status_code == 401
    other = httpx.get(f"{server.url}/v1/sessions/probe-0", headers={"Authorization": f"Bearer {token}"})
    assert other.status_code == 403

    # The API key never reached the browser: not in a request, the page, or its storage.
    assert sent and all(API_KEY not in value for headers in sent for value in headers.values())
    assert any(h.get("authorization") == f"Bearer {token}" for h in sent if h["url"].endswith("/v1/chat"))
    assert API_KEY not in page.content() and API_KEY not in page.evaluate("JSON.stringify(localStorage)")

    # A new conversation forgets the session.
    page.get_by_role("button", name="New conversation").click()
    assert log.locator("li.message").count() == 0
    assert stored_session(page) is None
    assert not page.get_by_role("status").filter(has_text="A person will take over").is_visible()
    page.close()


def test_errors_show_and_the_text_is_kept(server, browser):
    page = browser.new_page()
    page.goto(server.url + "/")
    page.evaluate("document.getElementById('message').removeAttribute('maxlength')")
    box = page.get_by_label("Your message")
    box.fill("z" * 2500)
    box.press("Enter")
    alert = page.get_by_role("alert")
    alert.wait_for(state="visible")
    assert "limit is 2,000" in alert.inner_text()
    assert box.input_value() == "z" * 2500  # nothing the customer wrote is lost
    page.close()


def test_a_token_the_server_no_longer_accepts_starts_a_new_conversation(server, browser):
    """After a restart with a new session secret (or an expiry) the stored token is refused: the page
    forgets it and the next message starts a new conversation, with no error for the customer."""
    page = browser.new_page()
    page.goto(server.url + "/")
    stale = {"session_id": "web:from-before", "token": "sbt1.web:from-before.9999999999.not-signed-here",
             "expires_at": 9999999999}
    page.evaluate("value => localStorage.setItem('supportbot.web_session', JSON.stringify(value))", stale)
    page.reload()
    page.wait_for_function("localStorage.getItem('supportbot.web_session') === null")
    box = page.get_by_label("Your message")
    box.fill("where is my order #48213")
    box.press("Enter")
    page.locator("li.message.bot").first.wait_for()
    assert not page.get_by_role("alert").is_visible()
    assert stored_session(page)["session_id"] not in ("web:from-before", None)
    page.close()
