"""One rule, one place: session ids, message length and hygiene, folders and validation-error
wording are each defined once (bot.validation, bot.paths) and every layer follows the same rule."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bot import paths
from bot.chatbot import Chatbot
from bot.classifier import IntentClassifier
from bot.sessions import SQLiteSessionStore, default_sessions_path
from bot.validation import (
    MAX_MESSAGE_CHARS,
    InvalidMessage,
    InvalidSessionId,
    MessageTooLong,
    UnprintableMessage,
    check_message,
    check_session_id,
    describe_validation_errors,
)
from finetune.cache import default_cache_dir
from finetune.data import DataError, load
from serve.schemas import ChatRequest
from serve.settings import Settings, load_settings
from supportbot.cli import default_model_dir

SESSION_IDS = ["c0ffee42", "chatwoot:1:7", "generic:a.b_c-d", "alice@example.com", "x" * 128,
               "x" * 129, "has spaces", "ünïcode", "-dash-first", "a\x00b", "line\nbreak", ""]


@pytest.mark.parametrize("session_id", SESSION_IDS)
def test_the_http_schema_and_the_session_store_accept_the_same_session_ids(session_id):
    try:
        check_session_id(session_id)
        bot_accepts = True
    except InvalidSessionId:
        bot_accepts = False
    try:
        ChatRequest(session_id=session_id, message="hi")
        http_accepts = True
    except ValidationError:
        http_accepts = False
    assert bot_accepts == http_accepts


def test_serving_the_chatbot_and_training_data_share_one_message_limit(shop_bundle, tmp_path):
    shop_classifier = IntentClassifier.from_bundle(shop_bundle)
    assert load_settings(None).max_message_chars == MAX_MESSAGE_CHARS
    with SQLiteSessionStore(tmp_path / "s.sqlite3") as store:
        bot = Chatbot(shop_classifier, store)
        assert bot.max_message_chars == MAX_MESSAGE_CHARS
        with pytest.raises(MessageTooLong, match="the limit is 2,000"):
            bot.respond("s1", "x" * (MAX_MESSAGE_CHARS + 1))
        assert bot.respond("s1", "where is my order " + "x" * (MAX_MESSAGE_CHARS - 18)).text
    data = tmp_path / "long.csv"
    data.write_text("text,label\nhello,greet\n" + "x" * (MAX_MESSAGE_CHARS + 1) + ",greet\n", encoding="utf-8")
    with pytest.raises(DataError, match="the limit is 2000"):
        load(str(data))


@pytest.mark.parametrize("text,error", [
    ("\x00\x01", UnprintableMessage), ("hi\x1b[31m", UnprintableMessage), ("a\x7fb", UnprintableMessage),
    ("\x85", UnprintableMessage), ("\x0b", UnprintableMessage), ("  ", InvalidMessage), ("\ud800", InvalidMessage),
    (None, InvalidMessage), ("x" * 2001, MessageTooLong),
])
def test_messages_with_control_characters_or_blank_are_refused(text, error):
    with pytest.raises(error) as refused:
        check_message(text)
    assert "\x00" not in str(refused.value) and "x" * 20 not in str(refused.value)  # the input is never quoted


@pytest.mark.parametrize("text", ["where is my order?\n\tthanks\r\n", "café ☕ 👩‍💻", "a" * 2000, "x\u200by"])
def test_ordinary_text_and_whitespace_pass(text):
    assert check_message(text) == text


def test_every_folder_follows_the_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SUPPORTBOT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SUPPORTBOT_MODEL", str(tmp_path / "model"))
    settings = Settings()
    assert settings.sessions_path == default_sessions_path() == tmp_path / "data" / "sessions.sqlite3"
    assert default_cache_dir() == tmp_path / "data" / "cache"
    assert default_model_dir() == tmp_path / "model"
    monkeypatch.delenv("SUPPORTBOT_DATA_DIR")
    monkeypatch.delenv("SUPPORTBOT_MODEL")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Settings().sessions_path == default_sessions_path() == paths.DEFAULT_DATA_DIR / "sessions.sqlite3"
    assert default_cache_dir() == tmp_path / "xdg" / "supportbot"
    assert default_model_dir() == paths.DEFAULT_MODEL_DIR


def test_validation_errors_name_the_field_and_never_the_input():
    with pytest.raises(ValidationError) as invalid:
        ChatRequest.model_validate({"message": "secret text", "session_id": "no spaces allowed", "extra": 1})
    described = describe_validation_errors(invalid.value)
    assert described.startswith("session_id: String should match pattern")
    assert "extra: Extra inputs are not permitted" in described
    assert "secret" not in described and "no spaces allowed" not in described
    many = [{"loc": ("body", "texts", i), "msg": "bad", "type": "x"} for i in range(13)]
    assert describe_validation_errors(many).endswith("texts.9: bad (and 3 more)")
    assert describe_validation_errors([{"loc": ("x",), "msg": "m", "type": "extra_forbidden"}],
                                      renamed={"extra_forbidden": "unknown setting"}) == "x: unknown setting"
