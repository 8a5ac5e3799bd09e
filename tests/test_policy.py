"""The dialogue policy: each action, clarify follow-ups, slots, fallback counting, handoff.

Predictions are built here with chosen probabilities, the responses are the real shop pack's,
and the thresholds are picked by each test (in a real bot they come from the bundle).
"""

from __future__ import annotations

import numpy as np
import pytest

from bot.classifier import Prediction
from bot.dialogue import DialogueConfig
from bot.domains import pack_path
from bot.policy import (
    NONE_OF_THESE,
    Action,
    DialoguePolicy,
    Reason,
    decide,
    decision_masks,
    resolve_choice,
)
from bot.responses import Domain
from bot.sessions import PendingChoice, PendingSlot, SessionState

ANSWER, CLARIFY, FALLBACK, HANDOFF = Action.ANSWER, Action.CLARIFY, Action.FALLBACK, Action.HANDOFF

FLOOR, GAP = 0.6, 0.1


@pytest.fixture(scope="module")
def domain() -> Domain:
    return Domain.from_file(pack_path("shop") / "responses.yaml")


@pytest.fixture()
def policy(domain) -> DialoguePolicy:
    return DialoguePolicy(domain, floor=FLOOR, gap=GAP)


def pred(*ranking: tuple[str, float]) -> Prediction:
    return Prediction(label=ranking[0][0], confidence=ranking[0][1], ranking=list(ranking), out_of_scope=ranking[0][1] < FLOOR)


SURE = lambda intent: pred((intent, 0.95), ("complaint", 0.02))  # noqa: E731
UNSURE = pred(("order_status", 0.30), ("delivery_late", 0.20), ("refund_status", 0.15), ("return_item", 0.10))
NOISE = pred(("greet", 0.08), ("warranty", 0.07), ("discount_code", 0.06), ("store_location", 0.05))
AMBIGUOUS = pred(("refund_status", 0.46), ("return_item", 0.41), ("cancel_order", 0.05))


def run(policy, state, *turns):
    """Feed (text, prediction) pairs; return the decisions and the final state."""
    decisions = []
    for text, prediction in turns:
        decision, state = policy.step(state, text, prediction)
        decisions.append(decision)
    return decisions, state


# ---- the shared rule stays as calibration uses it -------------------------------------------------


def test_decide_is_the_shared_rule():
    assert decide(0.9, 0.05, FLOOR, GAP) == ANSWER
    assert decide(0.45, 0.40, FLOOR, GAP) == CLARIFY
    assert decide(0.3, 0.1, FLOOR, GAP) == FALLBACK
    assert list(decide(np.array([0.9, 0.45, 0.3]), np.array([0.05, 0.4, 0.1]), FLOOR, GAP)) == [ANSWER, CLARIFY, FALLBACK]
    clarify, answer = decision_masks([0.9, 0.45], [0.05, 0.4], FLOOR, GAP)
    assert clarify.tolist() == [False, True] and answer.tolist() == [True, False]


# ---- answer ------------------------------------------------------------------------------------------


def test_confident_answer(policy):
    (d,), state = run(policy, SessionState(), ("what payment methods do you take", SURE("payment_methods")))
    assert (d.action, d.intent, d.slot, d.confidence) == (ANSWER, "payment_methods", None, 0.95)
    assert state.pending is None and state.turns == 1


@pytest.mark.parametrize("intent", ["greet", "goodbye", "thanks"])
def test_greeting_goodbye_thanks_are_answered(policy, intent):
    (d,), state = run(policy, SessionState(fallbacks=1), ("hi", SURE(intent)))
    assert (d.action, d.intent, d.slot) == (ANSWER, intent, None)
    assert state.fallbacks == 0


def test_goodbye_drops_a_pending_question(policy):
    _, state = run(policy, SessionState(), ("where is my order", SURE("order_status")), ("bye", SURE("goodbye")))
    assert state.pending is None


# ---- slots ---------------------------------------------------------------------------------------------


def test_missing_slot_is_asked_for_and_the_next_message_fills_it(policy):
    (ask, filled), state = run(
        policy, SessionState(),
        ("where is my order", SURE("order_status")),
        ("12345", UNSURE),  # a bare number classifies as nothing in particular
    )
    assert (ask.action, ask.intent, ask.slot) == (ANSWER, "order_status", "order_id")
    assert (filled.action, filled.intent, filled.slot, filled.reason) == (ANSWER, "order_status", None, Reason.SLOT_FILLED)
    assert filled.confidence == 0.95  # the confidence of the message that named the intent
    assert state.slots == {"order_id": "#12345"} and state.pending is None


def test_slot_in_the_message_needs_no_prompt(policy):
    (d,), state = run(policy, SessionState(), ("where is order #48213", SURE("order_status")))
    assert (d.action, d.slot) == (ANSWER, None)
    assert state.slots["order_id"] == "#48213"


def test_slots_persist_in_the_session(policy):
    (_, d), state = run(
        policy, SessionState(),
        ("where is order 48213", SURE("order_status")),
        ("I want to send it back", SURE("return_item")),
    )
    assert (d.intent, d.slot) == ("return_item", None)
    assert state.slots == {"order_id": "#48213"}


def test_email_slot(policy):
    (ask, filled), state = run(
        policy, SessionState(),
        ("I forgot my password", SURE("reset_password")),
        ("it's jo@example.org", UNSURE),
    )
    assert ask.slot == "email" and filled.reason == Reason.SLOT_FILLED and state.slots == {"email": "jo@example.org"}


def test_a_reply_without_the_slot_is_asked_again_and_counts_as_a_fallback(policy):
    (_, again, handoff), state = run(
        policy, SessionState(),
        ("where is my order", SURE("order_status")),
        ("I don't have it", UNSURE),
        ("no idea", UNSURE),
    )
    assert (again.action, again.slot, again.reason) == (FALLBACK, "order_id", Reason.SLOT_MISSING)
    assert (handoff.action, handoff.reason) == (HANDOFF, Reason.REPEATED_FALLBACK)
    assert state.handed_off


def test_a_new_confident_intent_replaces_the_slot_question(policy):
    (_, d), state = run(
        policy, SessionState(),
        ("where is my order", SURE("order_status")),
        ("what payment methods can I use", SURE("payment_methods")),
    )
    assert (d.action, d.intent, d.slot) == (ANSWER, "payment_methods", None)
    assert state.pending is None


# ---- clarify -------------------------------------------------------------------------------------------


def test_ambiguous_message_asks_which_one(policy):
    (d,), state = run(policy, SessionState(fallbacks=1), ("about my money back for the shoes", AMBIGUOUS))
    assert (d.action, d.options) == (CLARIFY, ("refund_status", "return_item"))
    assert isinstance(state.pending, PendingChoice) and state.fallbacks == 0


@pytest.mark.parametrize(
    "answer, chosen",
    [
        ("the first one", "refund_status"), ("1", "refund_status"), ("First.", "refund_status"), ("A", "refund_status"),
        ("the second", "return_item"), ("option 2", "return_item"), ("b", "return_item"), ("the latter", "return_item"),
        ("Refund status", "refund_status"), ("return an item", "return_item"), ("return_item", "return_item"),
        ("yes the refund one", "refund_status"),
    ],
)
def test_clarify_follow_up_resolves(policy, answer, chosen):
    (_, d), state = run(policy, SessionState(), ("money back", AMBIGUOUS), (answer, UNSURE))
    assert (d.action, d.intent, d.reason) == (ANSWER, chosen, Reason.CHOSEN)
    assert d.slot == "order_id"  # both options need the order number, asked for next
    assert state.pending == PendingSlot(intent=chosen, slot="order_id", confidence=0.46)


def test_no_clarify_between_small_talk_and_a_question(policy):
    hello_order = pred(("greet", 0.46), ("order_status", 0.44), ("delivery_late", 0.05))
    (d,), _state = run(policy, SessionState(), ("hi, where is order 12345", hello_order))
    assert (d.action, d.intent, d.reason, d.confidence) == (ANSWER, "order_status", Reason.SOCIAL_MIX, 0.44)
    thanks_bye = pred(("thanks", 0.50), ("goodbye", 0.48))
    (d,), _ = run(policy, SessionState(), ("thanks, bye", thanks_bye))
    assert (d.action, d.intent) == (ANSWER, "thanks")


def test_clarify_neither_is_a_fallback(policy):
    (_, d), state = run(policy, SessionState(), ("money back", AMBIGUOUS), ("neither", UNSURE))
    assert (d.action, d.reason, d.options) == (FALLBACK, Reason.NONE_OF_THESE, ())
    assert state.fallbacks == 1 and state.pending is None


def test_clarify_ignored_for_a_new_confident_message(policy):
    (_, d), _ = run(policy, SessionState(), ("money back", AMBIGUOUS), ("how much is shipping", SURE("shipping_options")))
    assert (d.action, d.intent) == (ANSWER, "shipping_options")


def test_resolve_choice_cases():
    options, titles = ["refund_status", "return_item"], ["Refund status", "Return an item"]
    assert resolve_choice("the first one please", options, titles) == "refund_status"
    assert resolve_choice("no, the second one", options, titles) == "return_item"
    assert resolve_choice("none of them", options, titles) is NONE_OF_THESE
    assert resolve_choice("the third", options, titles) is None  # there is no third option
    assert resolve_choice("first I want to know the price", options, titles) is None
    assert resolve_choice("", options, titles) is None


# ---- fallback and handoff ----------------------------------------------------------------------------


def test_unsure_fallback_suggests_the_top_intents(policy):
    (d,), state = run(policy, SessionState(), ("hmm my parcel thing", UNSURE))
    assert (d.action, d.out_of_scope) == (FALLBACK, False)
    assert d.options == ("order_status", "delivery_late", "refund_status")
    assert state.fallbacks == 1 and state.pending == PendingChoice(d.options, UNSURE.confidence)
    (d2,), state = run(policy, state, ("Late delivery", UNSURE))  # the quick reply's text
    assert (d2.action, d2.intent, d2.reason) == (ANSWER, "delivery_late", Reason.CHOSEN)
    assert state.fallbacks == 0


def test_suggestions_are_the_fewest_intents_that_hold_the_floor(policy):
    two = pred(("return_item", 0.40), ("refund_status", 0.35), ("warranty", 0.01))
    (d,), _ = run(policy, SessionState(), ("return it and refund", two))
    assert d.options == ("return_item", "refund_status")
    social = pred(("greet", 0.36), ("order_status", 0.25), ("delivery_late", 0.24), ("refund_status", 0.14))
    (d,), _ = run(policy, SessionState(), ("hi where's my stuff", social))
    assert d.options == ("order_status", "delivery_late", "refund_status")  # greetings are never suggested


def test_noise_is_out_of_scope(policy):
    (d,), state = run(policy, SessionState(), ("what's the weather", NOISE))
    assert (d.action, d.reason, d.out_of_scope, d.options) == (FALLBACK, Reason.OUT_OF_SCOPE, True, ())
    assert "greet" not in d.options and state.fallbacks == 1


def test_two_consecutive_fallbacks_hand_off(policy):
    (first, second), state = run(policy, SessionState(), ("weather?", NOISE), ("a joke?", NOISE))
    assert first.action == FALLBACK
    assert (second.action, second.reason) == (HANDOFF, Reason.REPEATED_FALLBACK)
    assert state.handed_off and state.fallbacks == 0


def test_an_answer_resets_the_fallback_counter(policy):
    decisions, _state = run(
        policy, SessionState(),
        ("weather?", NOISE), ("what payment methods", SURE("payment_methods")), ("a joke?", NOISE), ("football?", NOISE),
    )
    assert [d.action for d in decisions] == [FALLBACK, ANSWER, FALLBACK, HANDOFF]


def test_fallbacks_before_handoff_is_a_domain_setting(domain):
    from dataclasses import replace

    patient = DialoguePolicy(replace(domain, dialogue=DialogueConfig(handoff_after_fallbacks=3)), floor=FLOOR, gap=GAP)
    decisions, _ = run(patient, SessionState(), ("a", NOISE), ("b", NOISE), ("c", NOISE))
    assert [d.action for d in decisions] == [FALLBACK, FALLBACK, HANDOFF]


def test_handoff_intent_hands_off_and_the_bot_stays_silent(policy):
    (d, silent, still), state = run(
        policy, SessionState(),
        ("I want a human", SURE("talk_to_human")),
        ("hello?", SURE("greet")),
        ("where is order 12345", SURE("order_status")),
    )
    assert (d.action, d.reason, d.silent) == (HANDOFF, Reason.HANDOFF_INTENT, False)
    for s in (silent, still):
        assert (s.action, s.silent, s.reason, s.intent) == (HANDOFF, True, Reason.SILENT, None)
    assert state.handed_off and state.turns == 3


def test_silent_needs_no_prediction(policy):
    (d,), _ = run(policy, SessionState(handed_off=True), ("anyone there?", None))
    assert d.silent


def test_after_release_the_bot_speaks_again(policy):
    _, state = run(policy, SessionState(), ("I want a human", SURE("talk_to_human")))
    state.handed_off = False  # what Chatbot.release() stores
    (d,), state = run(policy, state, ("thanks", SURE("thanks")))
    assert (d.action, d.silent) == (ANSWER, False)


def test_handoff_offered_as_a_clarify_option_hands_off_when_chosen(policy):
    torn = pred(("talk_to_human", 0.47), ("complaint", 0.43))
    (c, d), state = run(policy, SessionState(), ("I am fed up", torn), ("Talk to a person", UNSURE))
    assert c.action == CLARIFY and (d.action, d.intent) == (HANDOFF, "talk_to_human") and state.handed_off


def test_the_state_passed_in_is_not_changed(policy):
    before = SessionState(slots={"email": "a@b.co"})
    run(policy, before, ("where is order 12345", SURE("order_status")))
    assert before == SessionState(slots={"email": "a@b.co"})
