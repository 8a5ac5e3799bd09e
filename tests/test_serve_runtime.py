"""The serving runtime: domain errors raised deep in bot/ or the runtime get their status and code
from one table (serve/errors.py), on the API and (transient ones as 429) on the webhooks; warm-up
texts come from the bundle being loaded."""

from __future__ import annotations

import json

import httpx
import pytest
from serve_helpers import live_server, make_settings

from bot.chatbot import Chatbot
from bot.errors import SupportbotError
from bot.sessions import SQLiteSessionStore
from serve import runtime_errors, signing
from serve.errors import ERRORS, as_api_error, rule_for
from serve.runtime import warmup_texts
from serve.runtime_errors import NotReady, Overloaded, ServingError

SECRET = "errors-webhook-secret"


def test_every_serving_error_has_a_rule_and_derives_from_the_one_base():
    for cls in vars(runtime_errors).values():
        if isinstance(cls, type) and issubclass(cls, ServingError) and cls is not ServingError:
            assert rule_for(cls("x")) is not None, cls
    assert all(issubclass(cls, SupportbotError) for cls in ERRORS)


def test_transient_refusals_say_when_to_retry_and_take_the_routes_status():
    api = as_api_error(Overloaded("the server is busy; retry in a moment"))
    assert (api.status, api.code, api.headers) == (503, "overloaded", {"Retry-After": "1"})
    hook = as_api_error(NotReady("the webhook outbox is starting; retry", retry_after=3), transient_status=429)
    assert (hook.status, hook.code, hook.headers) == (429, "not_ready", {"Retry-After": "3"})
    assert as_api_error(ValueError("not a domain error")).status == 500


@pytest.fixture(scope="module")
def server(shop_bundle, tmp_path_factory):
    settings = make_settings(shop_bundle, tmp_path_factory.mktemp("errors"), webhook_secret=SECRET,
                             admin_token="errors-admin-token")
    with live_server(settings) as live:
        yield live


@pytest.fixture()
def rival_writer(server, monkeypatch):
    """Another process's writer on the same store commits before every commit of the server's:
    a real SessionConflict, raised deep inside the Chatbot, on every attempt."""
    store = server.runtime.store
    rival = SQLiteSessionStore(store.path)
    real_commit = store.commit

    def commit_after_the_rival(session_id, state, turns):
        rival.commit(session_id, rival.load(session_id), [])
        return real_commit(session_id, state, turns)

    monkeypatch.setattr(store, "commit", commit_after_the_rival)
    yield
    rival.close()


def test_a_session_conflict_deep_in_the_bot_is_503_session_busy_on_the_api(server, rival_writer):
    response = httpx.post(f"{server.url}/v1/chat", json={"session_id": "contested", "message": "hi"}, timeout=30)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json() == {"error": {"code": "session_busy",
                                         "message": "this conversation is busy with another message; retry"}}


def test_the_same_conflict_is_429_on_a_webhook_so_the_platform_retries(server, rival_writer):
    raw = json.dumps({"conversation_id": "contested", "message_id": "m1", "text": "hi"}).encode()
    headers = {"Content-Type": "application/json",
               **signing.sign(SECRET, raw, signing.SUPPORTBOT, delivery_id="errors-d1")}
    response = httpx.post(f"{server.url}/v1/webhooks/generic", content=raw, headers=headers, timeout=30)
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "session_busy"


def test_an_unknown_session_is_404_from_the_runtime(server):
    response = httpx.get(f"{server.url}/v1/sessions/nobody-here", timeout=10,
                         headers={"Authorization": "Bearer errors-admin-token"})
    assert response.status_code == 404
    assert response.json() == {"error": {"code": "session_not_found", "message": "no conversation has this session id"}}


def test_warm_up_texts_come_from_the_bundle_not_from_a_shop(banking_head_bundle, shop_bundle, tmp_path):
    with SQLiteSessionStore(tmp_path / "s.sqlite3") as store:
        bank = Chatbot.from_bundle(banking_head_bundle, store)
        shop = Chatbot.from_bundle(shop_bundle, store)
    bank_texts, shop_texts = warmup_texts(bank), warmup_texts(shop)
    assert bank_texts[0] == bank.domain.title(bank.classifier.labels[0])  # e.g. "Activate my card"
    assert not set(bank_texts) & set(shop_texts)
    assert "order" not in " ".join(bank_texts).lower()
    assert max(map(len, shop_texts)) > 4 * min(map(len, shop_texts))  # short and long ones: both shapes are warmed
