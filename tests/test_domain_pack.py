"""The default domain pack (bot/domains/shop): sizes, a clean held-out split, complete responses."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import yaml

from bot.domains import pack_path
from bot.responses import PLACEHOLDER, Domain
from bot.slots import SLOT_TYPES

PACK = pack_path("shop")


def read(name: str) -> dict:
    return yaml.safe_load((PACK / name).read_text(encoding="utf-8"))


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@pytest.fixture(scope="module")
def nlu() -> dict:
    return read("nlu.yaml")


@pytest.fixture(scope="module")
def test_set() -> dict:
    return read("test.yaml")


@pytest.fixture(scope="module")
def responses() -> dict:
    return read("responses.yaml")


def test_the_pack_has_its_files():
    for name in ("nlu.yaml", "test.yaml", "responses.yaml", "README.md"):
        assert (PACK / name).is_file(), name


def test_at_least_30_intents_with_40_training_examples_each(nlu):
    intents = nlu["intents"]
    assert len(intents) >= 30
    small = {name: len(body["examples"]) for name, body in intents.items() if len(body["examples"]) < 40}
    assert small == {}


def test_held_out_set_covers_every_intent_with_12_and_60_out_of_scope(nlu, test_set):
    assert set(test_set["intents"]) == set(nlu["intents"])
    small = {name: len(body["examples"]) for name, body in test_set["intents"].items() if len(body["examples"]) < 12}
    assert small == {}
    assert len(test_set["out_of_scope"]) >= 60
    assert len(nlu.get("out_of_scope") or []) > 0  # calibration learns the floor from these


def _sentences(data: dict) -> list[str]:
    texts = [t for body in data["intents"].values() for t in body["examples"]]
    return [normalise(t) for t in texts + list(data.get("out_of_scope") or [])]


def test_train_and_test_share_no_sentence(nlu, test_set):
    shared = set(_sentences(nlu)) & set(_sentences(test_set))
    assert shared == set()


@pytest.mark.parametrize("name", ["nlu.yaml", "test.yaml"])
def test_no_file_repeats_a_sentence(name):
    repeated = {s: n for s, n in Counter(_sentences(read(name))).items() if n > 1}
    assert repeated == {}


def test_every_intent_has_responses_with_two_variations(nlu, responses):
    assert set(responses["intents"]) == set(nlu["intents"])
    few = {name: len(body["text"]) for name, body in responses["intents"].items() if len(body["text"]) < 2}
    assert few == {}
    for key in ("fallback", "clarify", "handoff", "out_of_scope"):
        assert len(responses[key]) >= 2, key


def test_placeholders_are_declared_slots(responses):
    for name, body in responses["intents"].items():
        slots = set(body.get("slots") or {})
        assert slots <= set(SLOT_TYPES), name
        for text in body["text"]:
            assert set(PLACEHOLDER.findall(text)) <= slots | {"shop_name"}, (name, text)
        for slot, spec in (body.get("slots") or {}).items():
            assert len(spec["prompt"]) >= 1, (name, slot)
    assert all("{options}" in t for t in responses["clarify"])


def test_the_responses_load_as_a_domain(nlu):
    domain = Domain.from_file(PACK / "responses.yaml", labels=list(nlu["intents"]))
    assert set(domain.special) == {"greeting", "goodbye", "thanks", "handoff"}
    assert all(not domain.intent(name).generic for name in nlu["intents"])
    assert domain.menu  # the greeting offers quick replies


def test_every_quick_reply_is_understood_by_the_default_model(shop_bundle, responses):
    """A button the model does not understand is a broken button: each quick reply must be
    answered (not a fallback) by the trained default model at its own thresholds."""
    from bot.classifier import IntentClassifier
    from bot.policy import Action, decide

    classifier = IntentClassifier.from_bundle(shop_bundle)
    buttons = sorted({q for body in responses["intents"].values() for q in body.get("quick_replies") or []})
    assert buttons
    broken = {}
    for text, prediction in zip(buttons, classifier.predict(buttons)):
        top2 = prediction.ranking[1][1] if len(prediction.ranking) > 1 else 0.0
        if decide(prediction.confidence, top2, classifier.confidence_floor, classifier.ambiguity_gap) != Action.ANSWER:
            broken[text] = prediction.ranking[:2]
    assert broken == {}
