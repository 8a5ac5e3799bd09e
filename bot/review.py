"""The review queue: the messages the bot did not understand, grouped, biggest problem first; and the
corrections file that labelling them writes.

Where items come from: the stored turns (bot/sessions.py, `SessionStore.recent_turns`), the last
`max_turns` of every session store, SQLite or PostgreSQL alike. A customer turn is queued when the
bot fell back, asked a clarify question or handed the conversation to a person; when it answered
but the serving model's lead of its top intent over the runner-up is below `margin` (a low-margin
answer); and when the customer said "no" to "Was this helpful?" after a knowledge answer (the
question that got the unhelpful answer is queued, not the "no"). Replies to the bot's own question
(a clarify option picked, a slot filled, the helpful yes/no) and the turns a person answered after
a handoff (nothing classified) are not queued: their text is not a request the model should learn.

Why the margin is measured again, with the serving model: turns store the top confidence only, and
the grouping needs the message's vector anyway; one forward pass of the bundle's backend
(`IntentClassifier.embed_and_logits`: the frozen encoder and its pooling, the same path as serving)
gives both. The default `margin` is the bundle's own confidence floor (thresholds are data of a
bundle): an answer whose lead is smaller than the confidence the bundle demands of any answer.

Grouping (decision): average-linkage agglomerative clustering on cosine distance, cut at
1 - `similarity`. Average linkage does not chain (single linkage joined unrelated messages through
a run of near neighbours), needs no number of groups (a queue has no true k), and is deterministic.
Groups are numbered by size, largest first (ties: the newest message first), so the first group is
the largest problem. Inside a group the least certain message (smallest margin) leads.

Labelling order (`labelling_order`, decision): an uncertainty-weighted k-center walk. The least certain
message comes first; after it, always the message whose (1 - margin) times its cosine distance to the
nearest message listed above it is largest. A reviewer with a budget labels from the top: uncertain
messages first, and each page covers different confusions, since a near-duplicate of a message listed
above scores near zero however uncertain it is (the grouping's similarity cut is not needed for that).
Computed once per queue build on the same vectors as the grouping (O(n^2), seconds at the item cap).
The queue is listed either way (`Queue.listed`, ORDERS): "group" for triage (each group's members
together), "label" for labelling with a budget. Measured with the active-learning benchmark
(bench/bench_active.py, docs/review.md; chosen on validation seeds 11-13 with
bench/bench_active_orders.py): in 3 rounds of 100 with a retrain between them it beat the previous
label order (every group's least certain message, largest group first, then every group's second)
on all three validation seeds, +1.88 against +1.58 points over random; walking the "group" order
spent the labels on paraphrases and did no better than random. Seeding the walk with the texts
labelled already (their vectors as messages listed above) measured no better (+1.81): not done.

Corrections (`Corrections`): a YAML file in the domain pack's nlu.yaml format (`intents: {name:
{examples: [...]}}`, `out_of_scope: [...]`), so `supportbot train` and `supportbot retrain` read it as
data. Every change re-reads the file under an exclusive lock and replaces it atomically
(bot/fileio.atomic_write_text): nothing already labelled is lost, by a crash or by another worker
writing at the same moment. A text already in the file keeps its first label (reported, not
overwritten); labelled texts leave the queue. Customer texts are data: nothing here logs them.
Reading it refuses an intent with an empty name and an empty example or out-of-scope text, naming the
corrections file and the entry (`Corrections.read`): before, `supportbot retrain` merged them first and
failed on the generated OUTPUT.data/nlu.yaml, which it had just replaced.
"""

from __future__ import annotations

import fcntl
import re
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from .errors import SupportbotError
from .fileio import atomic_write_text, read_yaml

if TYPE_CHECKING:
    from .classifier import IntentClassifier

# Why a turn is queued (ReviewItem.reason).
FALLBACK, CLARIFY, HANDOFF, LOW_MARGIN, NOT_HELPFUL = "fallback", "clarify", "handoff", "low_margin", "not_helpful"
REASONS = (FALLBACK, CLARIFY, HANDOFF, LOW_MARGIN, NOT_HELPFUL)
QUEUED_ACTIONS = {"fallback": FALLBACK, "clarify": CLARIFY, "handoff": HANDOFF}
ANSWER_ACTIONS = ("answer", "knowledge")
# Bot reasons whose user turn answered the bot's own question (bot/policy.py Reason values).
REPLY_REASONS = {"chosen", "slot_filled", "helpful", "not_helpful", "none_of_these", "silent"}

ORDERS = ("group", "label")  # Queue.listed: the triage view, and the order to label in
ORDERS_HELP = (  # what the API's `order` parameter and `supportbot review --order` say of ORDERS
    "group: by group, the largest first (triage); label: the least certain message first, then always the one "
    "whose uncertainty x distance to those listed above it is largest, so near-duplicates wait (the order to label in)"
)
OUT_OF_SCOPE = "oos"  # finetune.data.OOS_LABEL: the label out_of_scope examples train as
INTENT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_CORRECTIONS_BYTES = 32 << 20


class ReviewError(SupportbotError):
    """A labelling request or corrections file that cannot be used; the message is one line."""


@dataclass(frozen=True)
class ReviewItem:
    """One queued customer message."""

    id: int  # the turn's seq in the store: stable while the queue changes around it
    text: str
    action: str  # what the bot did with it
    intent: str | None  # the intent predicted then
    confidence: float  # the calibrated top confidence then
    session_id: str
    at: str
    reason: str  # one of REASONS
    margin: float = 1.0  # the serving model's top-1 minus top-2 now
    predicted: str | None = None  # the serving model's top intent now
    group: int = -1
    group_size: int = 1


@dataclass
class Queue:
    """The built queue: items in group order (largest group first), and what it was built from."""

    items: list[ReviewItem]
    groups: int
    scanned_turns: int
    model_version: str
    margin: float
    similarity: float
    labelled: int = 0  # queued turns left out because their text is in the corrections file
    labelling: list[int] = field(default_factory=list)  # positions of items in the "label" order (labelling_order)
    by_id: dict[int, ReviewItem] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_id = {item.id: item for item in self.items}
        if sorted(self.labelling) != list(range(len(self.items))):
            raise ValueError("labelling must list every item's position once")

    def group_members(self, group: int) -> list[ReviewItem]:
        return [item for item in self.items if item.group == group]

    def listed(self, order: str = "group") -> list[ReviewItem]:
        """The items as the page, the API and the CLI list them: ORDERS[0] "group" (by group, the largest
        first, its members together) or "label" (`labelling_order`: the least certain message first, then
        always the one whose uncertainty times its distance to everything listed above it is largest)."""
        if order == "group":
            return self.items
        if order == "label":
            return [self.items[p] for p in self.labelling]
        raise ReviewError(f"unknown order {order!r}: expected one of {', '.join(ORDERS)}")


def normalise(text: str) -> str:
    """The key two texts are the same message by (case and white space do not count)."""
    return " ".join(text.split()).casefold()


def candidates(turns: Sequence[dict[str, Any]]) -> tuple[list[ReviewItem], list[ReviewItem]]:
    """(queued for what the bot did, answered: queued only if the margin is low), from turns oldest first."""
    queued: dict[int, ReviewItem] = {}
    answered: dict[int, ReviewItem] = {}
    last_user: dict[str, ReviewItem] = {}
    pending: dict[str, ReviewItem] = {}  # a user turn waiting for its bot turn (same session)
    for turn in turns:
        session = str(turn["session_id"])
        if turn["role"] == "bot":
            item = pending.pop(session, None)
            reason = (turn.get("metadata") or {}).get("reason")
            if item is None:
                continue
            if reason in REPLY_REASONS:
                continue
            if item.action in QUEUED_ACTIONS:
                queued[item.id] = replace(item, reason=QUEUED_ACTIONS[item.action])
            elif item.action in ANSWER_ACTIONS:
                answered[item.id] = item
            last_user[session] = item
            continue
        if turn["role"] != "user":
            continue
        feedback = (turn.get("metadata") or {}).get("feedback")
        if isinstance(feedback, dict) and feedback.get("helpful") is False and session in last_user:
            asked = last_user[session]
            answered.pop(asked.id, None)
            queued[asked.id] = replace(asked, reason=NOT_HELPFUL)
        pending.pop(session, None)
        if turn.get("intent") is None:  # handed off: a person answered it, nothing was classified
            continue
        pending[session] = ReviewItem(
            id=int(turn["seq"]), text=str(turn["text"]), action=str(turn["action"]), intent=turn["intent"],
            confidence=float(turn["confidence"]), session_id=session, at=str(turn["at"]), reason="",
        )
    return list(queued.values()), list(answered.values())


def group_vectors(vectors: np.ndarray, similarity: float) -> np.ndarray:
    """Cluster ids (0..k-1, arbitrary order): average linkage on cosine distance, cut at 1 - similarity."""
    n = len(vectors)
    if n < 2:
        return np.zeros(n, dtype=int)
    from scipy.cluster.hierarchy import fcluster, linkage

    tree = linkage(vectors.astype(np.float64), method="average", metric="cosine")
    return np.asarray(fcluster(tree, t=max(1e-9, 1.0 - similarity), criterion="distance"), dtype=int) - 1


def margins_of(classifier: IntentClassifier, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(unit vectors, top-1 minus top-2 probability, top intent) of texts under the serving model: one pass."""
    if not texts:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0), []
    embeddings, logits = classifier.embed_and_logits(list(texts))
    predictions = classifier.predictions_from_logits(logits, top_k=2)
    return (embeddings.float().numpy(), np.array([p.margin for p in predictions], dtype=float),
            [p.label for p in predictions])


def order_groups(labels: np.ndarray, margins: np.ndarray, recency: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group number by size, largest = 0; the item order: group, then smallest margin, then newest)."""
    ids, sizes = np.unique(labels, return_counts=True)
    newest = {int(c): int(recency[labels == c].max()) for c in ids}
    ranked = sorted((int(c) for c in ids), key=lambda c: (-int(sizes[ids == c][0]), -newest[c]))
    number = {c: i for i, c in enumerate(ranked)}
    groups = np.array([number[int(c)] for c in labels], dtype=int)
    order = np.lexsort((-recency, margins, groups))
    return groups, order


def labelling_order(vectors: np.ndarray, margins: np.ndarray) -> list[int]:
    """Positions of items, greedily: the next is the unlisted item with the largest (1 - margin) x cosine
    distance to the nearest item listed before it (the least certain item first). An uncertainty-weighted
    k-center order (see the module docstring): a near-duplicate of a listed item waits, however uncertain.
    O(n^2) in the items (about 5 s at the 5,000-item cap on one loaded core), once per queue build."""
    n = len(margins)
    if n == 0:
        return []
    unit = (vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    uncertainty = (1.0 - np.clip(margins, 0.0, 1.0)).astype(np.float32)
    nearest = np.full(n, 2.0, dtype=np.float32)  # cosine distance to the nearest listed item (2: none yet)
    listed = np.zeros(n, dtype=bool)
    order: list[int] = []
    for _ in range(n):
        score = np.where(listed, -1.0, uncertainty * nearest)
        j = int(np.argmax(score))  # ties: the earlier position (queue order) first
        order.append(j)
        listed[j] = True
        np.minimum(nearest, np.maximum(1.0 - unit @ unit[j], 0.0), out=nearest)
    return order


def build_queue(
    turns: Sequence[dict[str, Any]], classifier: IntentClassifier, *, similarity: float, margin: float | None = None,
    labelled: Collection[str] = frozenset(), max_items: int = 5000,
) -> Queue:
    """The queue from stored turns (oldest first): candidates, the model's margins and vectors, groups, and
    the labelling order. `labelled`: texts labelled already (any case and spacing), left out."""
    threshold = classifier.confidence_floor if margin is None else margin
    queued, answered = candidates(turns)
    everything = queued + answered
    done = {normalise(text) for text in labelled}
    kept = [item for item in everything if normalise(item.text) not in done]
    left_out = len(everything) - len(kept)
    kept = sorted(kept, key=lambda item: item.id)[-max_items * 4:]  # answered turns are mostly confident
    vectors, margins, predicted = margins_of(classifier, [item.text for item in kept])
    keep = np.array([item.reason != "" or m < threshold for item, m in zip(kept, margins)], dtype=bool)
    chosen = [replace(item, reason=item.reason or LOW_MARGIN, margin=round(float(m), 4), predicted=p)
              for item, m, p, yes in zip(kept, margins, predicted, keep) if yes][-max_items:]
    vectors = vectors[keep][-max_items:] if len(kept) else vectors
    if not chosen:
        return Queue([], 0, len(turns), classifier.version, threshold, similarity, left_out)
    labels = group_vectors(vectors, similarity)
    groups, order = order_groups(labels, np.array([i.margin for i in chosen]), np.array([i.id for i in chosen]))
    sizes = np.bincount(groups)
    items = [replace(chosen[i], group=int(groups[i]), group_size=int(sizes[groups[i]])) for i in order]
    labelling = labelling_order(vectors[order], np.array([item.margin for item in items]))
    return Queue(items, int(groups.max()) + 1, len(turns), classifier.version, threshold, similarity, left_out,
                 labelling)


# ---- the corrections file ------------------------------------------------------------------------


def _check_texts(path: Path, what: str, texts: list[str]) -> None:
    """ReviewError naming the file and the first empty (or blank) text: `<file>: <what> N: empty text`."""
    for number, text in enumerate(texts, start=1):
        if not text.strip():
            raise ReviewError(f"{path}: {what} {number}: empty text")


@dataclass
class Corrections:
    """The labels given in review, in the domain pack's nlu.yaml format (see the module docstring)."""

    path: Path
    intents: dict[str, list[str]] = field(default_factory=dict)
    out_of_scope: list[str] = field(default_factory=list)
    new_intents: set[str] = field(default_factory=set)

    @classmethod
    def read(cls, path: str | Path) -> Corrections:
        """The file's labels; an empty set when it does not exist yet. ReviewError when it is not usable."""
        path = Path(path)
        if not path.exists():
            return cls(path)
        data = read_yaml(path, error=ReviewError, max_bytes=MAX_CORRECTIONS_BYTES)
        if data is None:
            return cls(path)
        if not isinstance(data, dict) or not isinstance(data.get("intents", {}), dict):
            raise ReviewError(f"{path}: expected a mapping with 'intents: {{name: {{examples: [...]}}}}'")
        corrections = cls(path)
        for number, (name, body) in enumerate((data.get("intents") or {}).items(), start=1):
            if name is None or not str(name).strip():
                raise ReviewError(f"{path}: intent {number} under 'intents': empty name")
            examples = body.get("examples") if isinstance(body, dict) else None
            if not isinstance(examples, list) or not all(isinstance(t, str) for t in examples):
                raise ReviewError(f"{path}: intent {name!r}: expected a list of texts under 'examples'")
            _check_texts(path, f"intent {name!r} example", examples)
            corrections.intents[str(name)] = list(examples)
            if isinstance(body, dict) and body.get("new"):
                corrections.new_intents.add(str(name))
        oos = data.get("out_of_scope") or []
        if not isinstance(oos, list) or not all(isinstance(t, str) for t in oos):
            raise ReviewError(f"{path}: expected a list of texts under 'out_of_scope'")
        _check_texts(path, "out_of_scope text", oos)
        corrections.out_of_scope = list(oos)
        return corrections

    def labelled(self) -> set[str]:
        return {normalise(t) for texts in self.intents.values() for t in texts} | {normalise(t) for t in self.out_of_scope}

    def count(self) -> int:
        return sum(len(texts) for texts in self.intents.values()) + len(self.out_of_scope)

    def add(self, texts: Sequence[str], label: str, *, new: bool = False) -> tuple[int, int]:
        """Add texts under `label` (OUT_OF_SCOPE for out of scope); (added, already labelled)."""
        seen = self.labelled()
        added = 0
        for text in texts:
            key = normalise(text)
            if key in seen:
                continue
            seen.add(key)
            (self.out_of_scope if label == OUT_OF_SCOPE else self.intents.setdefault(label, [])).append(text)
            added += 1
        if new and label != OUT_OF_SCOPE:
            self.new_intents.add(label)
        return added, len(texts) - added

    def to_yaml(self) -> str:
        intents: dict[str, Any] = {}
        for name, examples in self.intents.items():
            body: dict[str, Any] = {"description": "added in review" if name in self.new_intents else
                                    "corrections from review"}
            if name in self.new_intents:
                body["new"] = True
            body["examples"] = examples
            intents[name] = body
        data: dict[str, Any] = {"version": 1, "language": "en", "intents": intents}
        if self.out_of_scope:
            data["out_of_scope"] = self.out_of_scope
        header = "# Corrections from the review queue (supportbot review): domain pack nlu.yaml format.\n"
        return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000)

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, self.to_yaml())


@contextmanager
def locked_corrections(path: str | Path) -> Iterator[Corrections]:
    """The corrections file, read under an exclusive lock (other threads and processes wait) and written
    back atomically when the block ends without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            corrections = Corrections.read(path)
            before = corrections.to_yaml()
            yield corrections
            if corrections.to_yaml() != before:
                corrections.write()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_label(target: str, intent: str | None, known: Sequence[str], corrections: Corrections) -> tuple[str, bool]:
    """(label, is new) for a labelling request; ReviewError (one line) when it does not fit the model."""
    if target == "out_of_scope":
        if intent:
            raise ReviewError("out_of_scope takes no intent")
        return OUT_OF_SCOPE, False
    if not intent:
        raise ReviewError(f"{target} needs an intent name")
    if target == "intent":
        if intent not in known and intent not in corrections.new_intents:
            raise ReviewError(f"unknown intent {intent!r}: pick one of the model's intents, or label it as a new intent")
        return intent, False
    if target == "new_intent":
        if not INTENT_NAME.match(intent):
            raise ReviewError(f"new intent name {intent!r}: use lower-case letters, digits and _ "
                              "(a letter first, at most 64 characters)")
        if intent in known or intent == OUT_OF_SCOPE:
            raise ReviewError(f"intent {intent!r} exists already: label the item with it as an existing intent")
        return intent, True
    raise ReviewError(f"unknown target {target!r}: expected intent, new_intent or out_of_scope")
