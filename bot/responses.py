"""What the bot says: a domain's responses (responses.yaml), validated, with generic defaults.

A domain pack's `responses.yaml` (bot/domains/shop/responses.yaml documents the format) gives
each intent a title, answer variations, the slots it needs with their prompts, and quick
replies, plus the fallback / clarify / handoff / out-of-scope texts and which intents are the
greeting, goodbye, thanks and handoff. A bundle without one (e.g. trained on BANKING77) gets
`Domain.generic(labels)`: answers built from the intent name ("card_arrival" -> "Card arrival")
and the texts of bot/generic_responses.yaml. Variations are picked deterministically from a key
(session and turn), so a conversation replays the same way.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .dialogue import DialogueConfig
from .errors import SupportbotError
from .fileio import read_yaml
from .slots import SLOT_TYPES
from .validation import describe_validation_errors

GENERIC_FILE = Path(__file__).resolve().parent / "generic_responses.yaml"
PLACEHOLDER = re.compile(r"\{(\w+)\}")
ROLES = ("greeting", "goodbye", "thanks", "handoff")
SOCIAL_ROLES = ("greeting", "goodbye", "thanks")
MAX_RESPONSES_BYTES = 4 << 20


class ResponsesError(SupportbotError):
    """A responses file that cannot be used; the message is one line naming the file and the place."""


@dataclass(frozen=True)
class IntentResponses:
    """One intent's replies: `texts` may use its slots and {shop_name}; prompts ask for a missing slot."""

    name: str
    title: str
    texts: tuple[str, ...]
    slot_prompts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    quick_replies: tuple[str, ...] = ()
    generic: bool = False  # built from the name: no written answer exists
    from_knowledge: bool = False  # `answer: knowledge`: quote the best help-centre article when it clears the floor, else `texts`

    @property
    def slots(self) -> tuple[str, ...]:
        return tuple(self.slot_prompts)


@dataclass(frozen=True)
class Domain:
    """Everything the bot can say for one model: per-intent responses and the dialogue texts."""

    shop_name: str
    intents: Mapping[str, IntentResponses]
    fallback: tuple[str, ...]
    clarify: tuple[str, ...]
    handoff: tuple[str, ...]
    out_of_scope: tuple[str, ...]
    answer: tuple[str, ...]  # generic answer texts with {title}, for intents without their own
    slot_retry: Mapping[str, tuple[str, ...]]  # when the reply to a slot prompt held no value
    special: Mapping[str, str]  # role (greeting, goodbye, thanks, handoff) -> intent name
    dialogue: DialogueConfig = field(default_factory=DialogueConfig)  # suggestions, handoff after fallbacks, commit attempts
    source: str = "generic"
    # Knowledge answers (docs/knowledge.md): {quote} from a passage, {title} of its article; then
    # "Was this helpful?" with the two feedback quick replies (helpful, not helpful) and what follows each.
    knowledge: tuple[str, ...] = ()
    knowledge_feedback: tuple[str, str] = ("Yes", "No")
    knowledge_helpful: tuple[str, ...] = ()
    knowledge_not_helpful: tuple[str, ...] = ()

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def generic(cls, labels: Iterable[str]) -> Domain:
        """Generic replies for a model without responses.yaml, social intents recognised by name."""
        return cls.from_mapping({}, labels=labels, source="generic")

    @classmethod
    def from_file(cls, path: str | Path, *, labels: Iterable[str] | None = None) -> Domain:
        """Read and validate a responses.yaml; `labels` (the model's intents) get generic replies when missing."""
        path = Path(path)
        data = read_yaml(path, error=ResponsesError, max_bytes=MAX_RESPONSES_BYTES)
        if not isinstance(data, dict):
            raise ResponsesError(f"{path}: expected a mapping with 'intents:'")
        if not isinstance(data.get("intents"), dict) or not data["intents"]:
            raise ResponsesError(f"{path}: 'intents' must map intent names to their responses")
        return cls.from_mapping(data, labels=labels, source=str(path))

    @classmethod
    def from_mapping(cls, data: dict[str, Any], *, labels: Iterable[str] | None = None, source: str) -> Domain:
        generic = _generic_data()
        where = _Where(source)
        shop_name = data.get("shop_name", generic["shop_name"])
        if not isinstance(shop_name, str) or not shop_name.strip():
            raise ResponsesError(where("shop_name", "must be a non-empty text"))
        intents: dict[str, IntentResponses] = {}
        for name, body in (data.get("intents") or {}).items():
            intents[str(name)] = _intent(str(name), body, where)
        labels = list(labels) if labels is not None else list(intents)
        special = _special(data.get("special"), generic["special_aliases"], labels, intents, where)
        answer = _texts(data, generic, "answer", {"title", "shop_name"}, where)
        handoff = _texts(data, generic, "handoff", {"shop_name"}, where)
        for label in labels:
            if label not in intents:
                intents[label] = _generic_intent(label, special, answer, handoff)
        dialogue = _dialogue(data, where)
        return cls(
            shop_name=shop_name.strip(),
            intents=intents,
            fallback=_texts(data, generic, "fallback", {"suggestions", "shop_name"}, where),
            clarify=_texts(data, generic, "clarify", {"options", "shop_name"}, where, required=frozenset({"options"})),
            handoff=handoff,
            out_of_scope=_texts(data, generic, "out_of_scope", {"shop_name"}, where),
            answer=answer,
            slot_retry=_slot_retry(data.get("slot_retry"), generic["slot_retry"], where),
            special=special,
            dialogue=dialogue,
            source=source,
            knowledge=_texts(data, generic, "knowledge", {"quote", "title", "shop_name"}, where, required=frozenset({"quote"})),
            knowledge_feedback=_feedback(data.get("knowledge_feedback", generic["knowledge_feedback"]), where),
            knowledge_helpful=_texts(data, generic, "knowledge_helpful", {"shop_name"}, where),
            knowledge_not_helpful=_texts(data, generic, "knowledge_not_helpful", {"shop_name"}, where),
        )

    # ---- lookups ---------------------------------------------------------------------------

    def intent(self, name: str) -> IntentResponses:
        """The responses of `name` (generic ones for an intent the domain does not know)."""
        found = self.intents.get(name)
        return found if found is not None else _generic_intent(name, self.special, self.answer, self.handoff)

    def title(self, name: str) -> str:
        return self.intent(name).title

    def role(self, intent: str | None) -> str | None:
        """greeting / goodbye / thanks / handoff when `intent` plays that part, else None."""
        return next((role for role, name in self.special.items() if name == intent), None)

    @property
    def handoff_intent(self) -> str | None:
        return self.special.get("handoff")

    @property
    def menu(self) -> tuple[str, ...]:
        """The main quick replies (the greeting's), offered when a message is out of scope."""
        greeting = self.special.get("greeting")
        return self.intent(greeting).quick_replies if greeting else ()

    def render(self, template: str, values: Mapping[str, str]) -> str:
        """Fill {placeholders}; {shop_name} is always known. Unknown placeholders stay as written."""
        merged = {"shop_name": self.shop_name, **values}
        return PLACEHOLDER.sub(lambda m: str(merged.get(m.group(1), m.group(0))), template)


def choose(texts: Sequence[str], *key: object) -> str:
    """A variation picked by a stable hash of `key` (e.g. session id, turn): repeatable, spread out."""
    if not texts:
        raise ValueError("no texts to choose from")
    digest = hashlib.sha256("\x1f".join(map(str, key)).encode()).digest()
    return texts[int.from_bytes(digest[:8], "big") % len(texts)]


def humanize(intent: str) -> str:
    """'card_arrival' -> 'Card arrival' (the rest of the name keeps its case: 'ATM_support' -> 'ATM support')."""
    words = " ".join(re.sub(r"[_\-\s]+", " ", intent).split())
    return words[:1].upper() + words[1:] if words else intent


def join_choices(items: Sequence[str], conjunction: str = "or") -> str:
    """'A', 'A or B', 'A, B or C'."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} {conjunction} {items[-1]}"


# ---- validation helpers ------------------------------------------------------------------------


class _Where:
    def __init__(self, source: str):
        self.source = source

    def __call__(self, place: str, problem: str) -> str:
        return f"{self.source}: {place}: {problem}"


def _dialogue(data: dict[str, Any], where: _Where) -> DialogueConfig:
    """The `dialogue:` section, with `handoff_after_fallbacks` also read at the top level (the older place)."""
    section = data.get("dialogue") or {}
    if not isinstance(section, dict):
        raise ResponsesError(where("dialogue", "must be a mapping of setting: value"))
    if "handoff_after_fallbacks" in data:
        section = {**section, "handoff_after_fallbacks": data["handoff_after_fallbacks"]}
    try:
        return DialogueConfig.model_validate(section, strict=True)
    except ValidationError as exc:
        raise ResponsesError(where("dialogue", describe_validation_errors(exc))) from None


@lru_cache(maxsize=1)
def _generic_data() -> dict[str, Any]:
    data: dict[str, Any] = read_yaml(GENERIC_FILE, error=ResponsesError)
    return data


def _text_list(value: Any, place: str, allowed: set[str], where: _Where, *, required: frozenset[str] = frozenset()) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ResponsesError(where(place, "expected a non-empty list of texts"))
    texts = []
    for number, text in enumerate(value, start=1):
        if not isinstance(text, str) or not text.strip():
            raise ResponsesError(where(f"{place} #{number}", "empty text"))
        used = set(PLACEHOLDER.findall(text))
        unknown = used - allowed
        if unknown:
            known = ", ".join("{" + p + "}" for p in sorted(allowed)) or "none"
            raise ResponsesError(where(f"{place} #{number}", f"placeholder {{{sorted(unknown)[0]}}} is not declared (allowed here: {known})"))
        if required - used:
            raise ResponsesError(where(f"{place} #{number}", f"must use {{{sorted(required - used)[0]}}}"))
        texts.append(" ".join(text.split()))
    return tuple(texts)


def _texts(data: dict[str, Any], generic: dict[str, Any], key: str, allowed: set[str], where: _Where, *, required: frozenset[str] = frozenset()) -> tuple[str, ...]:
    if data.get(key) is None:
        return _text_list(generic[key], key, allowed, _Where(str(GENERIC_FILE)), required=required)
    return _text_list(data[key], key, allowed, where, required=required)


def _intent(name: str, body: Any, where: _Where) -> IntentResponses:
    place = f"intents.{name}"
    if not isinstance(body, dict):
        raise ResponsesError(where(place, "expected a mapping with 'text:'"))
    title = body.get("title", humanize(name))
    if not isinstance(title, str) or not title.strip():
        raise ResponsesError(where(f"{place}.title", "must be a non-empty text"))
    slots = body.get("slots") or {}
    if not isinstance(slots, dict):
        raise ResponsesError(where(f"{place}.slots", "expected a mapping of slot names"))
    prompts: dict[str, tuple[str, ...]] = {}
    for slot, spec in slots.items():
        if slot not in SLOT_TYPES:
            raise ResponsesError(where(f"{place}.slots.{slot}", f"unknown slot (known: {', '.join(SLOT_TYPES)})"))
        if not isinstance(spec, dict) or "prompt" not in spec:
            raise ResponsesError(where(f"{place}.slots.{slot}", "expected 'prompt:' with a list of questions"))
        prompts[slot] = _text_list(spec["prompt"], f"{place}.slots.{slot}.prompt", {"shop_name"}, where)
    answer = body.get("answer", "text")
    if answer not in ("text", "knowledge"):
        raise ResponsesError(where(f"{place}.answer", "must be 'text' or 'knowledge'"))
    if answer == "knowledge" and body.get("text") is None:  # its text comes from the articles; this one if none fits
        texts: tuple[str, ...] = ()
    else:
        texts = _text_list(body.get("text"), f"{place}.text", {"shop_name", *prompts}, where)
    quick = body.get("quick_replies") or []
    if not isinstance(quick, list) or not all(isinstance(q, str) and q.strip() for q in quick):
        raise ResponsesError(where(f"{place}.quick_replies", "expected a list of texts"))
    return IntentResponses(
        name, title.strip(), texts, prompts, tuple(q.strip() for q in quick), from_knowledge=answer == "knowledge"
    )


def _feedback(value: Any, where: _Where) -> tuple[str, str]:
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, str) and v.strip() for v in value) or value[0].strip() == value[1].strip()):
        raise ResponsesError(where("knowledge_feedback", "expected two different texts: [helpful, not helpful]"))
    return value[0].strip(), value[1].strip()


def _special(value: Any, aliases: dict[str, list[str]], labels: list[str], intents: dict[str, Any], where: _Where) -> dict[str, str]:
    """Roles named by the file; roles it leaves out are found among the labels by their usual names."""
    if value is not None and not isinstance(value, dict):
        raise ResponsesError(where("special", "expected a mapping of role: intent"))
    special: dict[str, str] = {}
    for role, intent in (value or {}).items():
        if role not in ROLES:
            raise ResponsesError(where(f"special.{role}", f"unknown role (known: {', '.join(ROLES)})"))
        if not isinstance(intent, str) or (intent not in intents and intent not in labels):
            raise ResponsesError(where(f"special.{role}", f"{intent!r} is not an intent of this domain"))
        special[role] = intent
    lowered = {label.lower(): label for label in labels}
    for role in ROLES:
        if role not in special:
            match = next((lowered[a] for a in aliases.get(role, []) if a in lowered), None)
            if match is not None:
                special[role] = match
    return special


def _slot_retry(value: Any, generic: dict[str, list[str]], where: _Where) -> dict[str, tuple[str, ...]]:
    if value is not None and not isinstance(value, dict):
        raise ResponsesError(where("slot_retry", "expected a mapping of slot: [texts]"))
    merged = {**generic, **(value or {})}
    out = {}
    for slot, texts in merged.items():
        if slot not in SLOT_TYPES:
            raise ResponsesError(where(f"slot_retry.{slot}", f"unknown slot (known: {', '.join(SLOT_TYPES)})"))
        out[slot] = _text_list(texts, f"slot_retry.{slot}", {"shop_name"}, where)
    return out


def _generic_intent(name: str, special: Mapping[str, str], answer: Sequence[str], handoff: Sequence[str]) -> IntentResponses:
    """Replies for an intent without written responses: a social text when it plays a role, else {title}."""
    role = next((r for r, intent in special.items() if intent == name), None)
    title = humanize(name)
    if role in SOCIAL_ROLES:
        texts = tuple(_generic_data()[role])
    elif role == "handoff":
        texts = tuple(handoff)
    else:
        texts = tuple(t.replace("{title}", title) for t in answer)
    return IntentResponses(name, title, texts, {}, (), generic=role is None)
