"""The dialogue policy: what to do with a classified message.

`decide()` is the single rule that turns a prediction into answer / clarify / fallback; the
same function (vectorised with numpy) picks thresholds during calibration, measures the
action mix during evaluation, and runs in the chatbot, so the three always agree.
Thresholds are data of a model version (bundle.json), never constants here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np

from .dialogue import DialogueConfig
from .responses import SOCIAL_ROLES
from .sessions import PendingChoice, PendingFeedback, PendingSlot, SessionState
from .slots import extract as extract_slots

if TYPE_CHECKING:
    from .classifier import Prediction
    from .knowledge import Hit
    from .responses import Domain



class Action(StrEnum):
    """What the bot does with a message. A StrEnum: it is its value in JSON, SQLite and metrics."""

    ANSWER = "answer"
    CLARIFY = "clarify"
    FALLBACK = "fallback"
    HANDOFF = "handoff"
    KNOWLEDGE = "knowledge"  # the reply quotes a help-centre article (bot/knowledge.py, docs/knowledge.md)


ACTIONS = tuple(Action)


def decide(top1: Any, top2: Any, floor: float, gap: float) -> Any:
    """answer when top-1 clears the floor and leads top-2 by at least the gap; clarify when the
    two are within the gap but together clear the floor ("did you mean A or B?"); else fallback.

    Works on floats or numpy arrays (then returns an array of action names).
    """
    clarify, answer = decision_masks(top1, top2, floor, gap)
    out = np.where(clarify, Action.CLARIFY.value, np.where(answer, Action.ANSWER.value, Action.FALLBACK.value))
    return str(out) if out.ndim == 0 else out


def decision_masks(top1: Any, top2: Any, floor: Any, gap: Any) -> tuple[np.ndarray, np.ndarray]:
    """(clarify, answer) as boolean arrays (broadcast over the inputs); the rest is fallback."""
    top1, top2 = np.asarray(top1, dtype=float), np.asarray(top2, dtype=float)
    clarify = (top1 - top2 < gap) & (top1 + top2 >= floor)
    answer = ~clarify & (top1 >= floor)
    return clarify, answer


# ---- the stateful dialogue policy ------------------------------------------------------------
#
# Around `decide()`: a handoff intent or too many fallbacks in a row hand the conversation to a
# person (the bot then stays silent until released); a clarify question or fallback suggestions
# leave a pending choice that the next message can resolve ("the first one", an option's title);
# an answer whose intent needs a slot that is not known yet asks for it, and the next message
# fills it. The policy changes only a copy of the session state and says nothing itself: the
# Chatbot turns a Decision into words.



class Reason(StrEnum):
    """Why a decision was taken (Decision.reason); stored with the bot's turn in the transcript."""

    CONFIDENT = "confident"
    CHOSEN = "chosen"  # a pending choice was resolved
    SLOT_FILLED = "slot_filled"
    AMBIGUOUS = "ambiguous"
    LOW_CONFIDENCE = "low_confidence"
    OUT_OF_SCOPE = "out_of_scope"
    NONE_OF_THESE = "none_of_these"
    SLOT_MISSING = "slot_missing"
    HANDOFF_INTENT = "handoff_intent"
    REPEATED_FALLBACK = "repeated_fallback"
    SILENT = "silent"
    SOCIAL_MIX = "social_mix"  # clarify zone, but one option is a greeting/thanks/goodbye: answer the other
    KNOWLEDGE = "knowledge"  # the intents would fall back, and a help-centre passage cleared the retrieval floor
    INTENT_KNOWLEDGE = "intent_knowledge"  # the intent declares `answer: knowledge` and its best article clears the floor
    HELP_CENTRE_QUESTION = "help_centre_question"  # an intent was confident, but the router reads a help-centre question and an article clears the floor
    HELPFUL = "helpful"  # "Was this helpful?" -> yes
    NOT_HELPFUL = "not_helpful"  # "Was this helpful?" -> no


@dataclass(frozen=True)
class Decision:
    """What to do with one message. `intent` is what the reply is about (for an answer, the intent
    answered, which after a resolved choice or a filled slot is not this message's top intent)."""

    action: Action
    intent: str | None
    confidence: float
    reason: Reason
    options: tuple[str, ...] = ()  # clarify: the intents asked about; fallback: the intents suggested
    slot: str | None = None  # answer: the slot to ask for; fallback: the slot asked for again
    out_of_scope: bool = False
    silent: bool = False
    passage: str | None = None  # knowledge: the passage quoted; helpful/not_helpful: the passage judged
    helpful: bool | None = None  # the customer's answer to "Was this helpful?" (stored with their turn)


class DialoguePolicy:
    """The bot's stateful rules; thresholds come from the model bundle, texts and roles from the
    Domain, the knobs (suggestions, handoff after fallbacks) from a DialogueConfig (default: the Domain's)."""

    def __init__(
        self, domain: Domain, *, floor: float, gap: float, dialogue: DialogueConfig | None = None,
        knowledge_floor: float | None = None, knowledge_margin: float = 0.0,
    ):
        self.domain = domain
        self.floor = float(floor)
        self.gap = float(gap)
        self.dialogue = dialogue if dialogue is not None else domain.dialogue
        self.knowledge_floor = knowledge_floor  # the bundle's fitted retrieval floor; None: no articles
        self.knowledge_margin = knowledge_margin  # the bundle's fitted lead over the runner-up article

    def step(
        self, state: SessionState, text: str, prediction: Prediction | None, knowledge: Hit | None = None
    ) -> tuple[Decision, SessionState]:
        """Decide what to do with `text` (classified as `prediction`; `knowledge`: its best help-centre
        passage, floor not applied) and return the session's next state."""
        state = replace(state, slots=dict(state.slots))
        state.turns += 1
        if state.handed_off:
            return Decision(Action.HANDOFF, None, 0.0, Reason.SILENT, silent=True), state
        if prediction is None:
            raise ValueError("a message needs a prediction unless the session is handed off")
        pending, state.pending = state.pending, None
        if isinstance(pending, PendingFeedback):
            verdict = resolve_feedback(text, self.domain.knowledge_feedback)
            if verdict is not None:
                return self._feedback(state, verdict, pending.passage)
        expecting = pending.slot if isinstance(pending, PendingSlot) else None
        found = extract_slots(text, expecting=expecting)
        state.slots.update(found)
        action = self.base_action(prediction)

        if isinstance(pending, PendingChoice):
            options, titles = pending.options, [self.domain.title(o) for o in pending.options]
            chosen = resolve_choice(text, options, titles)
            if chosen is NONE_OF_THESE:
                return self._fallback(state, prediction, Reason.NONE_OF_THESE)
            if chosen is None and action != Action.ANSWER:
                chosen = choice_by_words(text, options, titles)
            if isinstance(chosen, str):
                confidence = pending.confidence if pending.confidence is not None else prediction.confidence
                return self._answer(state, chosen, confidence, Reason.CHOSEN, knowledge)
        if isinstance(pending, PendingSlot):
            if pending.slot in found:
                return self._answer(state, pending.intent, pending.confidence, Reason.SLOT_FILLED)
            if action != Action.ANSWER:
                return self._fallback(state, prediction, Reason.SLOT_MISSING, retry=pending)
        return self._route(state, prediction, action, knowledge)

    def base_action(self, prediction: Prediction) -> Action:
        """answer / clarify / fallback for one prediction, by the shared rule `decide()`."""
        ranking = prediction.ranking or [(prediction.label, prediction.confidence)]
        top1 = ranking[0][1]
        top2 = ranking[1][1] if len(ranking) > 1 else 0.0
        return Action(str(decide(top1, top2, self.floor, self.gap)))

    # ---- outcomes --------------------------------------------------------------------------

    def clears_floor(self, knowledge: Hit | None) -> bool:
        """A passage good enough to answer from on its own: it clears the bundle's fitted retrieval floor
        and leads the runner-up article by the fitted margin (`Hit.clears`, the rule training fits)."""
        return (knowledge is not None and self.knowledge_floor is not None
                and knowledge.clears(self.knowledge_floor, self.knowledge_margin))

    def _route(
        self, state: SessionState, prediction: Prediction, action: Action, knowledge: Hit | None = None
    ) -> tuple[Decision, SessionState]:
        if action == Action.ANSWER:
            if (knowledge is not None and knowledge.question_like and self.domain.role(prediction.label) is None
                    and self.clears_floor(knowledge)):  # a help-centre question a confident intent would have taken
                return self._knowledge(state, prediction.label, prediction.confidence, knowledge, Reason.HELP_CENTRE_QUESTION)
            return self._answer(state, prediction.label, prediction.confidence, Reason.CONFIDENT, knowledge)
        if action == Action.CLARIFY:
            options = tuple(name for name, _ in prediction.ranking[:2])
            social = [o for o in options if self.domain.role(o) in SOCIAL_ROLES]
            if social:  # "hi, where is my order": asking "Say hello or Track an order?" helps nobody
                chosen = next((o for o in options if o not in social), options[0])
                return self._answer(state, chosen, dict(prediction.ranking).get(chosen, 0.0), Reason.SOCIAL_MIX)
            state.fallbacks = 0
            state.pending = PendingChoice(options, prediction.confidence)
            return Decision(Action.CLARIFY, prediction.label, prediction.confidence, Reason.AMBIGUOUS, options=options), state
        if knowledge is not None and self.clears_floor(knowledge):
            return self._knowledge(state, None, prediction.confidence, knowledge, Reason.KNOWLEDGE)
        return self._fallback(state, prediction, Reason.LOW_CONFIDENCE)

    def _answer(
        self, state: SessionState, intent: str, confidence: float, reason: Reason, knowledge: Hit | None = None
    ) -> tuple[Decision, SessionState]:
        if self.domain.role(intent) == "handoff":
            return self._handoff(state, intent, confidence, Reason.HANDOFF_INTENT)
        if knowledge is not None and self.domain.intent(intent).from_knowledge and self.clears_floor(knowledge):
            return self._knowledge(state, intent, confidence, knowledge, Reason.INTENT_KNOWLEDGE)
        state.fallbacks = 0
        missing = next((slot for slot in self.domain.intent(intent).slots if slot not in state.slots), None)
        if missing is not None:
            state.pending = PendingSlot(intent, missing, confidence)
        return Decision(Action.ANSWER, intent, confidence, reason, slot=missing), state

    def _fallback(
        self, state: SessionState, prediction: Prediction, reason: Reason, *, retry: PendingSlot | None = None
    ) -> tuple[Decision, SessionState]:
        state.fallbacks += 1
        if state.fallbacks >= self.dialogue.handoff_after_fallbacks:
            return self._handoff(state, prediction.label, prediction.confidence, Reason.REPEATED_FALLBACK)
        if retry is not None:
            state.pending = retry
            return Decision(Action.FALLBACK, prediction.label, prediction.confidence, reason, slot=retry.slot), state
        if reason == Reason.NONE_OF_THESE:
            return Decision(Action.FALLBACK, prediction.label, prediction.confidence, reason), state
        options = self.suggest(prediction)
        if prediction.out_of_scope and not options:
            return Decision(Action.FALLBACK, prediction.label, prediction.confidence, Reason.OUT_OF_SCOPE,
                            out_of_scope=True), state
        if options:
            state.pending = PendingChoice(options, prediction.confidence)
        return Decision(Action.FALLBACK, prediction.label, prediction.confidence, reason, options=options), state

    def _knowledge(
        self, state: SessionState, intent: str | None, confidence: float, hit: Hit, reason: Reason
    ) -> tuple[Decision, SessionState]:
        """Quote the passage; the next message may answer "Was this helpful?". `confidence` stays the intent
        model's calibrated probability, as in every decision; the article's score travels in the reply's
        sources (it is not a probability: with the known question and the sentence terms it exceeds 1)."""
        state.fallbacks = 0
        state.pending = PendingFeedback(hit.passage.id)
        return Decision(Action.KNOWLEDGE, intent, confidence, reason, passage=hit.passage.id), state

    def _feedback(self, state: SessionState, helpful: bool, passage: str | None) -> tuple[Decision, SessionState]:
        if helpful:
            return Decision(Action.KNOWLEDGE, None, 1.0, Reason.HELPFUL, passage=passage, helpful=True), state
        state.fallbacks += 1
        if state.fallbacks >= self.dialogue.handoff_after_fallbacks:
            decision, state = self._handoff(state, None, 0.0, Reason.REPEATED_FALLBACK)
            return replace(decision, passage=passage, helpful=False), state
        return Decision(Action.FALLBACK, None, 0.0, Reason.NOT_HELPFUL, passage=passage, helpful=False), state

    def _handoff(self, state: SessionState, intent: str | None, confidence: float, reason: Reason) -> tuple[Decision, SessionState]:
        state.handed_off = True
        state.pending = None
        state.fallbacks = 0
        return Decision(Action.HANDOFF, intent, confidence, reason), state

    def suggest(self, prediction: Prediction) -> tuple[str, ...]:
        """The intents worth offering after a fallback: the fewest top intents (at most
        `dialogue.suggestions`, never greeting/goodbye/thanks/handoff) that together hold at least the
        confidence floor, i.e. "probably one of these". None when no such set exists: then
        the message is treated as out of scope.
        """
        wanted = [(name, p) for name, p in prediction.ranking if self.domain.role(name) is None]
        total = 0.0
        for count, (_, p) in enumerate(wanted[: self.dialogue.suggestions], start=1):
            total += p
            if total >= self.floor:
                return tuple(name for name, _ in wanted[:count])
        return ()


# ---- resolving a pending choice ----------------------------------------------------------------

NONE_OF_THESE = object()  # "neither", "none of them", "something else"

_ORDINALS = {
    "1": 0, "first": 0, "1st": 0, "former": 0,
    "2": 1, "two": 1, "second": 1, "2nd": 1,
    "3": 2, "three": 2, "third": 2, "3rd": 2,
    "last": -1, "latter": -1,
}
_LETTERS = {"a": 0, "b": 1, "c": 2}
_FILLER = {
    "the", "option", "number", "no", "please", "pls", "i", "mean", "meant", "it", "is", "its", "it's", "that",
    "this", "choice", "nr", "yes", "yeah", "yep", "ok", "okay", "one", "thanks", "thank", "you", "was", "about",
}
_NEGATIVE = {
    "neither", "none", "none of them", "neither of them", "neither one", "none of these", "no", "nope",
    "something else", "other", "another thing", "none of those", "neither of those", "not those", "no neither",
}
_STOPWORDS = {
    "a", "an", "the", "my", "i", "to", "of", "for", "and", "or", "is", "it", "in", "on", "with", "me", "do", "one",
    "about", "please", "want", "need", "mean", "meant", "that", "this", "its", "it's", "no", "yes", "can", "you", "your",
}


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def resolve_choice(text: str, options: Sequence[str], titles: Sequence[str]) -> str | object | None:
    """The option that `text` picks: its title or name, or its place ("2", "the first one", "the
    latter"); NONE_OF_THESE for "neither"; None when the message does not answer the question."""
    said = _normal(text)
    if not said or not options:
        return None
    for option, title in zip(options, titles):
        if said in (_normal(title), _normal(option.replace("_", " ")), option.lower()):
            return option
    if said in _NEGATIVE:
        return NONE_OF_THESE
    words = said.split()
    if said in _LETTERS or said == "one":  # "A" / "b" as in "did you mean (a) ... or (b) ...", or "one"
        places, rest = {_LETTERS.get(said, 0)}, []
    else:
        places = {_ORDINALS[w] for w in words if w in _ORDINALS}
        rest = [w for w in words if w not in _ORDINALS and w not in _FILLER]
    if len(places) == 1 and not rest:
        index = places.pop()
        if -len(options) <= index < len(options):
            return options[index]
    return None


_YES = {"yes", "yes thanks", "yes thank you", "yes it did", "it did", "yep", "yeah", "yes it helped", "it helped",
        "helpful", "very helpful", "great thanks", "perfect", "thanks", "thank you", "yes please"}
_NO = {"no", "nope", "no it didn't", "no it did not", "it didn't", "it did not", "not really", "no not really",
       "not helpful", "no thanks", "didn't help", "it didn't help", "that didn't help", "no it didn't help"}


def resolve_feedback(text: str, labels: tuple[str, str]) -> bool | None:
    """The answer to "Was this helpful?": True / False, or None when the message is something else."""
    said = _normal(text)
    if said == _normal(labels[0]) or said in _YES:
        return True
    if said == _normal(labels[1]) or said in _NO:
        return False
    return None


def choice_by_words(text: str, options: Sequence[str], titles: Sequence[str]) -> str | None:
    """The one option whose title or name shares a content word with `text` ("the refund one")."""
    said = {_stem(w) for w in _normal(text).split() if w not in _STOPWORDS}
    hits = []
    for option, title in zip(options, titles):
        words = {_stem(w) for w in _normal(f"{title} {option.replace('_', ' ')}").split() if w not in _STOPWORDS}
        if said & words:
            hits.append(option)
    return hits[0] if len(hits) == 1 else None


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") else word
