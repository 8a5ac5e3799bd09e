"""The review page (/admin/review) in a real headless Chromium against a live server with the real shop
model: open it with the admin token, see the queue grouped, label one message as an existing intent and
a whole group as a new intent; the corrections file has them and they leave the queue."""

from __future__ import annotations

import httpx
import pytest
import yaml
from serve_helpers import live_server, make_settings

pytestmark = pytest.mark.browser

ADMIN = "review-page-admin-token-42"
GROUP = ["flibber jabberwock nonsense", "flibber jabberwock nonsense!!", "Flibber Jabberwock nonsense please"]
SINGLE = "I want to talk to a human"
ODD = "the purple elephant sings opera"  # the model's least certain message


@pytest.fixture(scope="module")
def server(shop_bundle, tmp_path_factory):
    settings = make_settings(shop_bundle, tmp_path_factory.mktemp("review-page"), admin_token=ADMIN)
    with live_server(settings) as live:
        with httpx.Client(base_url=live.url, timeout=120) as http:
            for i, text in enumerate([*GROUP, ODD, SINGLE]):
                assert http.post("/v1/chat", json={"session_id": f"p{i}", "message": text}).status_code == 200
        yield live




def test_review_page_labels_a_message_and_a_whole_group(server, browser):
    page = browser.new_page()
    page.goto(server.url + "/admin/review")
    assert page.get_by_role("heading", name="Review queue").is_visible()

    # A wrong token is refused, shown, and forgotten.
    page.get_by_label("Admin token").fill("wrong")
    page.get_by_role("button", name="Open the queue").click()
    page.get_by_role("alert").filter(has_text="admin token").wait_for()
    assert page.evaluate("sessionStorage.getItem('supportbot.admin_token')") is None

    page.get_by_label("Admin token").fill(ADMIN)
    page.get_by_role("button", name="Open the queue").click()
    queue = page.get_by_role("region", name="Queue")
    queue.wait_for()
    assert "Group 1 · 3 messages" in queue.inner_text()
    for text in [*GROUP, SINGLE]:
        assert page.get_by_role("radio", name=text, exact=True).count() == 1

    # The labelling order: the least certain message first, then the group's least certain member, its
    # near-duplicates after it, and the message the model is sure of (the handoff request) last.
    page.get_by_label("Order").select_option("label")
    page.wait_for_function(f"document.querySelectorAll('#items input')[0].getAttribute('aria-label') === {ODD!r}")
    page.wait_for_function(f"document.querySelectorAll('#items input')[1].getAttribute('aria-label') === {GROUP[2]!r}")
    page.wait_for_function(f"document.querySelectorAll('#items input')[4].getAttribute('aria-label') === {SINGLE!r}")
    page.get_by_label("Order").select_option("group")
    page.wait_for_function(f"document.querySelectorAll('#items input')[3].getAttribute('aria-label') === {SINGLE!r}")

    # One message to an existing intent.
    page.get_by_role("radio", name=SINGLE, exact=True).check()
    page.get_by_label("Label as").select_option("talk_to_human")
    page.get_by_role("button", name="Label message").click()
    page.get_by_role("status").filter(has_text="Labelled 1 message as talk_to_human").wait_for()
    page.wait_for_function(f"!document.querySelector('input[aria-label=\"{SINGLE}\"]')")

    # A bad new intent name: the server's message shows, nothing is written.
    page.get_by_role("radio", name=GROUP[1], exact=True).check()
    page.get_by_label("Label as").select_option(label="New intent…")
    page.get_by_label("New intent name").fill("Not A Name")
    page.get_by_role("button", name="Label whole group").click()
    page.get_by_role("alert").filter(has_text="lower-case").wait_for()

    # The whole group to a new intent.
    page.get_by_label("New intent name").fill("jabberwock_questions")
    page.get_by_role("button", name="Label whole group").click()
    page.get_by_role("status").filter(has_text="Labelled 3 messages as jabberwock_questions").wait_for()
    for text in GROUP:
        page.get_by_role("radio", name=text, exact=True).wait_for(state="detached")
    assert not page.get_by_role("alert").is_visible()
    # The new intent is offered as an existing one from now on.
    assert page.locator("#target option[value='jabberwock_questions']").count() == 1

    corrections = yaml.safe_load(server.runtime.settings.corrections_path.read_text())
    assert sorted(corrections["intents"]["jabberwock_questions"]["examples"]) == sorted(GROUP)
    assert corrections["intents"]["talk_to_human"]["examples"] == [SINGLE]
    page.close()
