"""Slot extraction: order numbers and email addresses, in a message or as the answer to a prompt."""

from __future__ import annotations

import pytest

from bot.slots import SLOT_TYPES, extract


@pytest.mark.parametrize(
    "text, order_id",
    [
        ("#12345", "#12345"),
        ("where is # 48213?", "#48213"),
        ("where is order 12345", "#12345"),
        ("Order number 12345 please", "#12345"),
        ("order no. 123456 hasn't arrived", "#123456"),
        ("order nr 55555", "#55555"),
        ("my order is 55555", "#55555"),
        ("ORDER #987654321012", "#987654321012"),
        ("order: 77777, still nothing", "#77777"),
        ("orders 12345 and 67890", "#12345"),
    ],
)
def test_order_number_in_a_message(text, order_id):
    assert extract(text)["order_id"] == order_id


@pytest.mark.parametrize(
    "text",
    [
        "12345",  # bare digits only count when the bot just asked for the order number
        "order 1234",  # too short
        "order 1234567890123",  # 13 digits: not an order number
        "call +44 20 7946 0000",
        "I ordered 3 things on 12 March 2024",
        "abc#12345",
    ],
)
def test_no_order_number(text):
    assert "order_id" not in extract(text)


@pytest.mark.parametrize("text", ["12345", "it's 48213 thanks", "#48213", "sure: 123456789"])
def test_bare_number_answers_the_order_number_prompt(text):
    digits = "".join(ch for ch in text if ch.isdigit())
    assert extract(text, expecting="order_id") == {"order_id": f"#{digits}"}


def test_bare_number_too_short_or_too_long_does_not_answer_the_prompt():
    assert extract("1234", expecting="order_id") == {}
    assert extract("1234567890123", expecting="order_id") == {}


@pytest.mark.parametrize(
    "text, email",
    [
        ("my email is jane.doe@example.com", "jane.doe@example.com"),
        ("Jane.Doe+shop@mail.example.co.uk.", "Jane.Doe+shop@mail.example.co.uk"),
        ("<a_b@x-y.org>", "a_b@x-y.org"),
    ],
)
def test_email(text, email):
    assert extract(text)["email"] == email


@pytest.mark.parametrize("text", ["jane@localhost", "me at example dot com", "@example.com", "jane@.com"])
def test_no_email(text):
    assert "email" not in extract(text)


def test_several_slots_in_one_message():
    assert extract("order #12345, email jo@example.org") == {"order_id": "#12345", "email": "jo@example.org"}


def test_slot_types_are_the_declared_ones():
    assert set(SLOT_TYPES) == {"order_id", "email"}
