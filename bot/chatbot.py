"""The Chatbot: one message in, one reply out, for many sessions at once.

`Chatbot.respond()` classifies the message (or takes a Prediction made by a batcher), runs the
dialogue policy on the session's state, words the decision with the domain's responses, and
commits the new state and both turns to the session store in one transaction. It is safe to
call from many threads: turns of one session are serialised by a per-session lock, and a
commit that loses a race with another process (another replica on the same store) is retried
on the fresh state.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .bundle import Bundle, BundleError
from .classifier import IntentClassifier, Prediction
from .dialogue import DialogueConfig
from .knowledge import Hit, KnowledgeBase, Source
from .policy import Action, Decision, DialoguePolicy, Reason
from .responses import Domain, ResponsesError, choose, join_choices
from .sessions import APPLIED_KEYS, SessionConflict, SessionState, SessionStore, SessionStoreError, Turn
from .validation import MAX_MESSAGE_CHARS, InvalidMessage, check_message, check_session_id

__all__ = ["Chatbot", "InvalidMessage", "Reply", "load_domain"]

RESPONSES_FILE = "responses.yaml"

@dataclass
class Reply:
    """The bot's answer to one message (see docs/dialogue.md, Using the bot from Python)."""

    session_id: str
    text: str  # "" when silent
    action: Action  # answer | clarify | fallback | handoff | knowledge
    intent: str | None  # the intent the reply is about (None when nothing was classified)
    confidence: float  # calibrated top probability (0.0 when nothing was classified)
    ranking: list[tuple[str, float]]  # top intents of this message, calibrated probabilities
    quick_replies: list[str]  # buttons; their text comes back as a user message
    model_version: str
    handed_off: bool  # a human has the conversation (true on the handoff reply itself and after)
    silent: bool  # the bot must say nothing
    reason: Reason | None = field(default=None, compare=False)  # why the policy chose the action
    sources: list[Source] = field(default_factory=list)  # knowledge: the cited help-centre passage(s)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the ranking as [{"name", "confidence"}], like Prediction.to_dict()."""
        data = asdict(self)
        data["ranking"] = [{"name": name, "confidence": p} for name, p in self.ranking]
        return data


def replayed_reply(session_id: str, user: dict[str, Any], bot: dict[str, Any] | None, state: SessionState) -> Reply:
    """A stored reply rebuilt from its transcript turns (Chatbot.respond with a `key` seen before).

    Everything a channel sends comes back (text, action, quick replies, handoff, sources); the
    ranking, which is not stored, comes back empty."""
    if bot is None:  # the bot was silent
        return Reply(session_id=session_id, text="", action=Action(user["action"]), intent=user["intent"],
                     confidence=float(user["confidence"]), ranking=[], quick_replies=[],
                     model_version=user["model_version"], handed_off=state.handed_off, silent=True)
    meta = bot["metadata"]
    return Reply(
        session_id=session_id, text=bot["text"], action=Action(bot["action"]), intent=bot["intent"],
        confidence=float(bot["confidence"]), ranking=[], quick_replies=list(meta.get("quick_replies") or []),
        model_version=bot["model_version"], handed_off=bool(meta.get("handed_off", state.handed_off)), silent=False,
        reason=Reason(meta["reason"]) if meta.get("reason") else None,
        sources=[Source(**source) for source in meta.get("sources") or []],
    )


def load_domain(bundle: Bundle) -> Domain:
    """The bundle's responses.yaml as a Domain, or generic replies when it has none."""
    path = bundle.file(RESPONSES_FILE)
    if path is None:
        return Domain.generic(bundle.labels)
    try:
        return Domain.from_file(path, labels=bundle.labels)
    except ResponsesError as exc:
        raise BundleError(f"bundle {bundle.path}: {RESPONSES_FILE} is not usable: {exc}") from None


class Chatbot:
    """Classifier + dialogue policy + responses + session store."""

    def __init__(
        self,
        classifier: IntentClassifier,
        store: SessionStore,
        domain: Domain | None = None,
        *,
        max_message_chars: int = MAX_MESSAGE_CHARS,
        dialogue: DialogueConfig | None = None,
        knowledge: KnowledgeBase | None = None,
    ):
        self.classifier = classifier
        self.store = store
        self.domain = domain if domain is not None else Domain.generic(classifier.labels)
        self.dialogue = dialogue if dialogue is not None else self.domain.dialogue
        self.knowledge = knowledge
        self.policy = DialoguePolicy(
            self.domain, floor=classifier.confidence_floor, gap=classifier.ambiguity_gap, dialogue=self.dialogue,
            knowledge_floor=knowledge.floor if knowledge is not None else None,
            knowledge_margin=knowledge.margin if knowledge is not None else 0.0,
        )
        self.max_message_chars = max_message_chars
        self._locks: weakref.WeakValueDictionary[str, threading.Lock] = weakref.WeakValueDictionary()
        self._locks_guard = threading.Lock()

    @classmethod
    def from_bundle(
        cls, path: str | Path, store: SessionStore, *, backend: str | None = None, num_threads: int | None = None,
        **kwargs: Any,
    ) -> Chatbot:
        """Load a verified bundle on `backend` (bot/classifier.py); its responses.yaml (if any) gives the texts,
        its knowledge files the articles."""
        classifier = IntentClassifier.from_bundle(path, backend=backend, num_threads=num_threads)
        knowledge = KnowledgeBase.from_bundle(classifier.bundle)
        return cls(classifier, store, load_domain(classifier.bundle), knowledge=knowledge, **kwargs)

    @property
    def version(self) -> str:
        return self.classifier.version

    # ---- conversation ----------------------------------------------------------------------

    def respond(
        self, session_id: str, text: str, *, prediction: Prediction | None = None, metadata: dict[str, Any] | None = None,
        key: str | None = None,
    ) -> Reply:
        """Answer one user message in a session (created on first use).

        `key` makes the message idempotent (a platform's message id): a message whose key the
        session has already applied is not answered again; its stored reply is returned.
        """
        check_session_id(session_id)
        text = self._check_text(text)
        if prediction is None and not self.store.load(session_id).handed_off:
            prediction = self.classifier.predict([text])[0]
        with self._lock(session_id):
            for attempt in range(self.dialogue.commit_attempts):
                state = self.store.load(session_id)
                if key is not None and key in state.applied:
                    return self._replayed(session_id, key, state)
                if prediction is None and not state.handed_off:  # released since we looked
                    prediction = self.classifier.predict([text])[0]
                query, hit = self._retrieve(text, prediction)
                decision, new_state = self.policy.step(state, text, prediction, hit)
                reply = self._reply(session_id, decision, new_state, prediction, hit, query)
                turns = self._turns(text, reply, decision, prediction, metadata)
                if key is not None:
                    new_state = new_state.with_applied(key)
                    turns[0].metadata["key"] = key
                try:
                    self.store.commit(session_id, new_state, turns)
                    return reply
                except SessionConflict:
                    if attempt == self.dialogue.commit_attempts - 1:
                        raise
        raise AssertionError("unreachable")

    def handoff(self, session_id: str) -> None:
        """A human took the conversation (e.g. the platform assigned an agent): the bot goes silent."""
        self._update(session_id, lambda s: replace(s, handed_off=True, fallbacks=0, pending=None))

    def release(self, session_id: str) -> None:
        """The human is done: the bot answers again in this session, with a clean fallback count."""
        self._update(session_id, lambda s: replace(s, handed_off=False, fallbacks=0, pending=None))

    def reset(self, session_id: str) -> None:
        """The conversation is over: the next message starts fresh (no slots, nothing pending); the transcript stays."""
        self._update(session_id, lambda s: SessionState(turns=s.turns, applied=s.applied, rev=s.rev))

    def transcript(self, session_id: str) -> list[dict[str, Any]]:
        """Every stored turn of the session, oldest first: role, text, intent, confidence, action, model_version, at."""
        return self.store.transcript(session_id)

    # ---- internals -------------------------------------------------------------------------

    def _check_text(self, text: object) -> str:
        """The message by the one rule (bot.validation), its whitespace runs made single spaces."""
        return " ".join(check_message(text, limit=self.max_message_chars).split())

    def _lock(self, session_id: str) -> threading.Lock:
        with self._locks_guard:
            lock = self._locks.get(session_id)
            if lock is None:
                lock = threading.Lock()
                self._locks[session_id] = lock
            return lock

    def _update(self, session_id: str, change: Callable[[SessionState], SessionState]) -> None:
        check_session_id(session_id)
        with self._lock(session_id):
            for attempt in range(self.dialogue.commit_attempts):
                try:
                    self.store.commit(session_id, change(self.store.load(session_id)), [])
                    return
                except SessionConflict:
                    if attempt == self.dialogue.commit_attempts - 1:
                        raise

    def _replayed(self, session_id: str, key: str, state: SessionState) -> Reply:
        """The reply stored for the message with idempotency `key` (SessionState.applied), rebuilt
        from its transcript turns: the user turn that carries the key and the bot turn after it
        (none when the bot was silent)."""
        recent = self.store.transcript(session_id, limit=2 * APPLIED_KEYS + 2)
        for i, turn in enumerate(recent):
            if turn["role"] == "user" and turn["metadata"].get("key") == key:
                following = recent[i + 1] if i + 1 < len(recent) else None
                bot = following if following is not None and following["role"] == "bot" else None
                return replayed_reply(session_id, turn, bot, state)
        raise SessionStoreError(f"session {session_id!r} applied message {key!r} but its turn is not in the transcript")

    def _retrieve(self, text: str, prediction: Prediction | None) -> tuple[Any, Hit | None]:
        """(query vector, best passage) from the vector the intent pass computed; (None, None) without articles."""
        if self.knowledge is None or prediction is None:
            return None, None
        query = prediction.embedding
        if query is None:  # a prediction made elsewhere without its vector: embed once more, same path
            query = self.classifier.embed_and_logits([text])[0][0]
        return query, self.knowledge.best(query)

    def _reply(
        self, session_id: str, decision: Decision, state: SessionState, prediction: Prediction | None,
        hit: Hit | None = None, query: Any = None,
    ) -> Reply:
        cites = decision.action == Action.KNOWLEDGE and hit is not None and decision.passage == hit.passage.id
        if decision.silent:
            text, quick = "", []
        elif cites and hit is not None and self.knowledge is not None:
            quote = self.knowledge.quote(hit, query)
            key = (session_id, state.turns, decision.action)
            text = self.domain.render(choose(self.domain.knowledge, *key), {"quote": quote, "title": hit.passage.title})
            quick = list(self.domain.knowledge_feedback)
        else:
            text, quick = self._words(session_id, decision, state)
        return Reply(
            session_id=session_id,
            text=text,
            action=decision.action,
            intent=decision.intent,
            confidence=float(decision.confidence),
            ranking=list(prediction.ranking) if prediction is not None and not decision.silent else [],
            quick_replies=quick,
            model_version=self.version,
            handed_off=state.handed_off,
            silent=decision.silent,
            reason=decision.reason,
            sources=[hit.source()] if cites and hit is not None else [],
        )

    def _words(self, session_id: str, decision: Decision, state: SessionState) -> tuple[str, list[str]]:
        """The reply text and quick replies for a decision; variations picked by session and turn."""
        domain, key = self.domain, (session_id, state.turns, decision.action)
        if decision.action == Action.ANSWER:
            responses = domain.intent(decision.intent or "")
            if decision.slot is not None:
                return domain.render(choose(responses.slot_prompts[decision.slot], *key), {}), []
            texts = responses.texts or tuple(t.replace("{title}", responses.title) for t in domain.answer)  # answer: knowledge, no article cleared the floor
            return domain.render(choose(texts, *key), state.slots), list(responses.quick_replies)
        if decision.action == Action.KNOWLEDGE and decision.reason == Reason.HELPFUL:
            return domain.render(choose(domain.knowledge_helpful, *key), {}), []
        if decision.action == Action.CLARIFY:
            titles = [domain.title(o) for o in decision.options]
            return domain.render(choose(domain.clarify, *key), {"options": join_choices(titles)}), titles
        if decision.action == Action.FALLBACK:
            return self._fallback_words(decision, key)
        if decision.action == Action.HANDOFF:
            own = domain.intent(decision.intent or "") if decision.reason == Reason.HANDOFF_INTENT else None
            texts = own.texts if own is not None and not own.generic else domain.handoff
            return domain.render(choose(texts, *key), state.slots), []
        raise ValueError(f"unknown action {decision.action!r}")

    def _fallback_words(self, decision: Decision, key: tuple[object, ...]) -> tuple[str, list[str]]:
        domain = self.domain
        if decision.reason == Reason.NOT_HELPFUL:
            return domain.render(choose(domain.knowledge_not_helpful, *key), {}), self._handoff_button([])
        if decision.slot is not None:
            return domain.render(choose(domain.slot_retry[decision.slot], *key), {}), self._handoff_button([])
        if decision.out_of_scope:
            return domain.render(choose(domain.out_of_scope, *key), {}), list(domain.menu)
        titles = [domain.title(o) for o in decision.options]
        if titles:
            texts = [t for t in domain.fallback if "{suggestions}" in t] or domain.fallback
            return domain.render(choose(texts, *key), {"suggestions": join_choices(titles)}), self._handoff_button(titles)
        plain = [t for t in domain.fallback if "{suggestions}" not in t] or list(Domain.generic([]).fallback[:1])
        return domain.render(choose(plain, *key), {}), self._handoff_button([])

    def _handoff_button(self, quick: list[str]) -> list[str]:
        """A real desk always offers a way to a person after the bot failed to understand."""
        intent = self.domain.handoff_intent
        title = self.domain.title(intent) if intent else None
        return [*quick, title] if title and title not in quick else quick

    def _turns(
        self, text: str, reply: Reply, decision: Decision, prediction: Prediction | None, metadata: dict[str, Any] | None
    ) -> list[Turn]:
        user = Turn(
            role="user",
            text=text,
            intent=prediction.label if prediction is not None and not decision.silent else None,
            confidence=float(prediction.confidence) if prediction is not None and not decision.silent else 0.0,
            action=reply.action,
            model_version=reply.model_version,
            metadata=dict(metadata or {}),
        )
        if decision.helpful is not None:  # the answer to "Was this helpful?", kept with the turn that gave it
            user.metadata["feedback"] = {"helpful": decision.helpful, "passage_id": decision.passage}
        if reply.silent:
            return [user]
        bot = Turn(
            role="bot",
            text=reply.text,
            intent=reply.intent,
            confidence=reply.confidence,
            action=reply.action,
            model_version=reply.model_version,
            metadata={"reason": decision.reason, "quick_replies": reply.quick_replies, "handed_off": reply.handed_off,
                      **({"sources": [asdict(source) for source in reply.sources]} if reply.sources else {})},
        )
        return [user, bot]
