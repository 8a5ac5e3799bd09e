"""Responses: loading and validating responses.yaml, generic replies, variation choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bot.domains import pack_path
from bot.responses import Domain, ResponsesError, choose, humanize, join_choices

SHOP = pack_path("shop") / "responses.yaml"


def write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "responses.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


MINIMAL = {
    "shop_name": "Test Shop",
    "intents": {
        "order_status": {
            "title": "Track an order",
            "slots": {"order_id": {"prompt": ["What is your order number?"]}},
            "text": ["Order {order_id} is on its way from {shop_name}.", "Track {order_id} in your account."],
            "quick_replies": ["My delivery is late"],
        },
        "hello": {"text": ["Hi!", "Hello!"]},
    },
}


def test_a_minimal_file_loads_with_generic_defaults(tmp_path):
    domain = Domain.from_file(write(tmp_path, MINIMAL), labels=["order_status", "hello", "card_arrival"])
    assert domain.shop_name == "Test Shop"
    assert domain.intent("order_status").slots == ("order_id",)
    assert domain.special == {"greeting": "hello"}  # found by its usual name
    assert domain.handoff and domain.fallback and domain.out_of_scope  # generic texts fill the gaps
    card = domain.intent("card_arrival")  # a model label without responses
    assert card.generic and card.title == "Card arrival" and "Card arrival" in card.texts[0]
    assert domain.render(domain.intent("order_status").texts[0], {"order_id": "#12345"}) == (
        "Order #12345 is on its way from Test Shop.")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["intents"]["order_status"].update(text=["Order {order_number}"]), r"\{order_number\} is not declared"),
        (lambda d: d["intents"]["hello"].update(text=["Hi {email}"]), r"intents.hello.text #1: placeholder \{email\}"),
        (lambda d: d["intents"]["hello"].update(text=[]), "non-empty list"),
        (lambda d: d["intents"]["hello"].update(text=["  "]), "empty text"),
        (lambda d: d["intents"]["order_status"].update(slots={"phone": {"prompt": ["?"]}}), "unknown slot"),
        (lambda d: d["intents"]["order_status"].update(slots={"order_id": {}}), "prompt"),
        (lambda d: d.update(clarify=["Which one?"]), r"must use \{options\}"),
        (lambda d: d.update(special={"handoff": "nope"}), "not an intent"),
        (lambda d: d.update(special={"dance": "hello"}), "unknown role"),
        (lambda d: d.update(handoff_after_fallbacks=0), "greater than or equal to 1"),
        (lambda d: d.update(handoff_after_fallbacks=True), "handoff_after_fallbacks"),
        (lambda d: d.update(dialogue={"suggestions": 0}), "suggestions: Input should be greater than or equal to 1"),
        (lambda d: d.update(dialogue={"no_such_knob": 1}), "no_such_knob: Extra inputs are not permitted"),
        (lambda d: d.update(intents={}), "'intents' must map"),
    ],
)
def test_mistakes_are_one_clear_line(tmp_path, change, message):
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    change(data)
    with pytest.raises(ResponsesError, match=message) as info:
        Domain.from_file(write(tmp_path, data))
    assert str(tmp_path / "responses.yaml") in str(info.value) and "\n" not in str(info.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(ResponsesError, match="not valid YAML"):
        Domain.from_file(write(tmp_path, "intents: [unclosed"))
    with pytest.raises(ResponsesError, match="cannot read"):
        Domain.from_file(tmp_path / "missing.yaml")
    with pytest.raises(ResponsesError, match="expected a mapping"):
        Domain.from_file(write(tmp_path, "- a list"))


def test_generic_domain_for_a_model_without_responses():
    domain = Domain.generic(["card_arrival", "greeting", "goodbye", "talk_to_human", "ATM_support"])
    assert domain.special == {"greeting": "greeting", "goodbye": "goodbye", "handoff": "talk_to_human"}
    assert domain.intent("greeting").texts and "{" not in domain.intent("greeting").texts[0]
    assert domain.title("ATM_support") == "ATM support"
    assert domain.intent("talk_to_human").texts == domain.handoff


def test_the_shop_pack_loads():
    domain = Domain.from_file(SHOP)
    assert domain.shop_name and domain.handoff_intent == "talk_to_human"


def test_helpers():
    assert humanize("card_arrival") == "Card arrival"
    assert humanize("Refund_not_showing_up") == "Refund not showing up"
    assert join_choices(["A"]) == "A" and join_choices(["A", "B"]) == "A or B"
    assert join_choices(["A", "B", "C"]) == "A, B or C"
    texts = ["one", "two", "three"]
    assert choose(texts, "s", 1) == choose(texts, "s", 1)
    assert {choose(texts, "s", turn) for turn in range(30)} == set(texts)  # spread over the variations
    with pytest.raises(ValueError):
        choose([], "s")
