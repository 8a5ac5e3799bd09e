"""Slots: the details an answer needs (an order number, an email address), found in messages.

Each slot type has a pattern for a message that names it ("order #12345", "order number 12345",
an email address) and a looser pattern used only when the bot has just asked for that slot, so
that a bare "12345" answers "What is your order number?". Values are stored in the session in
their rendered form ("#12345"), which is also how replies show them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

ORDER_DIGITS = r"(\d{5,12})(?!\d)"


@dataclass(frozen=True)
class SlotType:
    """How to find one kind of value in a message and how to write it in a reply."""

    name: str
    pattern: re.Pattern[str]  # a message that names the value
    answer_pattern: re.Pattern[str]  # a reply to the bot's question for this slot
    render: Callable[[str], str]


ORDER_ID = SlotType(
    name="order_id",
    pattern=re.compile(
        r"(?:(?<![\w#])#\s?|\border(?:s)?\s*(?:number|num\.?|no\.?|nr\.?|id|ref(?:erence)?)?\s*(?:is|was|=|:)?\s*#?\s*)"
        + ORDER_DIGITS,
        re.IGNORECASE,
    ),
    answer_pattern=re.compile(r"(?<![\d\w])#?\s?" + ORDER_DIGITS),
    render=lambda digits: f"#{digits}",
)

_EMAIL = re.compile(r"(?<![\w.%+-])([A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})(?![\w-])")

EMAIL = SlotType(name="email", pattern=_EMAIL, answer_pattern=_EMAIL, render=lambda value: value)

SLOT_TYPES: dict[str, SlotType] = {slot.name: slot for slot in (ORDER_ID, EMAIL)}


def extract(text: str, *, expecting: str | None = None) -> dict[str, str]:
    """Every slot value found in `text`, rendered; `expecting` names a slot the bot just asked for."""
    found: dict[str, str] = {}
    for name, slot in SLOT_TYPES.items():
        match = slot.pattern.search(text)
        if match is None and name == expecting:
            match = slot.answer_pattern.search(text)
        if match is not None:
            found[name] = slot.render(match.group(1))
    return found
