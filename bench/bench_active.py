"""Active-learning simulation: does labelling what the review queue shows first beat labelling at random?

    OMP_NUM_THREADS=1 nice -n 10 python bench/bench_active.py              # 3 seeds, appends to BENCHMARKS.md
    python bench/bench_active.py --seeds 1 --no-record                     # one seed, print only

Per seed s (1, 2, 3):

1. The serving model: a `head` bundle on 10 BANKING77 train examples per intent (few_shot 10, seed s;
   the default recipe, seed s).
2. The live stream: 2,000 other BANKING77 train messages (seeded sample, disjoint from the 10-shot set).
   Each is a customer's first message: the model classifies it and the bot's own answer rule
   (bot.policy.decide at the bundle's fitted floor and gap) says what the bot did, stored as the
   user and bot turns a real conversation stores.
3. Labelling 300 of them (their gold BANKING77 labels stand in for the reviewer):
   - queue: the product's own loop, label -> retrain -> promote, in --rounds rounds (default 3 x 100).
     Each round the review queue is built from the stored turns as the product builds it
     (`bot.review.build_queue`: fallbacks, clarify questions and low-margin answers, near-duplicates
     grouped at the serving default similarity, labelled texts left out, margins measured again by
     the model the last round promoted) and walked from the top as the product lists it in its
     labelling order (`Queue.listed("label")`, what `GET /v1/admin/review?order=label`, the page's
     "To label" order and `supportbot review --order label` show: the least certain message first,
     then always the one with the largest (1 - margin) x distance to those listed above it); should
     the queue hold fewer than a round's labels, the rest are the unlabelled messages with the
     smallest margin. Then the same recipe retrains on the 10-shot set plus everything labelled so
     far, and that model serves the next round. `--order group` walks the triage order instead.
     Which stream message a queued item is comes from its turn's seq (`Stream.position`).
   - margin: the 300 stream messages with the smallest top-1 minus top-2 margin under the 10-shot
     model, in one round (uncertainty sampling without grouping; a reference point);
   - random: 300 drawn at random (seed s); rounds change nothing for it. With --random-draws N, N
     draws per seed (the first is this one), each retrained; their mean is the arm's expected accuracy,
     reported beside the single draw.
   A label is one message labelled: the page can label a whole group in one action, but each member
   is one more training example, so it costs one label each (a group of 5 is 5 of the 300).
   Why rounds (decision, measured on validation seeds 11-13 with bench/bench_active_orders.py): a team
   labels, retrains and looks at the queue again; in one round of 300 the queue's order is fixed by
   the 10-shot model, in three the retrained model re-ranks what is left. Walking the queue in its
   "group" order (each group's members together, largest first) spent the labels on paraphrases and
   did no better than random there, so the bench and docs/review.md use the labelling order; the
   present labelling order beat the previous one (each group's least certain message round-robin)
   on all three validation seeds.
4. Retrain: the same recipe on the 10-shot set plus the 300, and score top-1 accuracy on the full
   BANKING77 test split (3,080).

Speed: a `head` bundle reads the frozen base's pooled vectors, so every text is embedded once, through
the embedding cache `head` training uses (finetune/cache.py), and each bundle's head runs on the
cached vectors (`CachedHeadBackend`: the same vectors and head as the torch backend, without
running the encoder again for each of the 12 bundles).

Reported: mean ± sd over the seeds of each arm's test accuracy, and queue - random per seed. The run's
settings are a `Protocol` (the defaults are the reported run; --rounds, --order and --arms change it).
`--arms margin_by_intent` runs an older reference arm (smallest margins round-robin over the predicted
intents, measured and not kept).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import random
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.record import append_section, command_line  # noqa: E402
from bot import bundle as bundle_mod  # noqa: E402
from bot.classifier import IntentClassifier  # noqa: E402
from bot.encoder import DEFAULT_BASE, Encoder, base_weights_sha256, resolve_base  # noqa: E402
from bot.heads import IntentHead  # noqa: E402
from bot.policy import decide  # noqa: E402
from bot.review import ORDERS, build_queue, margins_of  # noqa: E402
from finetune import data  # noqa: E402
from finetune.cache import EmbeddingCache, default_cache_dir  # noqa: E402
from finetune.config import load_config  # noqa: E402
from finetune.train import train  # noqa: E402
from serve.settings import Settings  # noqa: E402

BANKING = "../shared/data/banking77"
MAX_LENGTH = 64  # the default recipe's, so training and the cached vectors agree
SIMILARITY = float(Settings.model_fields["review_similarity"].default)
ARMS = ("queue", "margin", "random", "margin_by_intent")  # what an arm labels: see the module docstring
DEFAULT_ARMS = ("queue", "margin", "random")


@dataclass(frozen=True)
class Protocol:
    """What one run of the simulation does (the command line's options; the defaults are the reported run)."""

    shots: int = 10  # the serving model's examples per intent
    stream: int = 2000  # live messages
    budget: int = 300  # messages labelled per arm
    rounds: int = 3  # the queue arm's labelling rounds, a retrain between them
    order: str = "label"  # the queue's listed order the queue arm walks (bot.review.ORDERS)
    similarity: float = SIMILARITY  # the queue's near-duplicate grouping (the serving default)
    arms: tuple[str, ...] = DEFAULT_ARMS
    random_draws: int = 1  # random draws of the budget per seed; the random arm is their mean accuracy


@dataclass(frozen=True)
class Stream:
    """The live stream of one seed: its labelled messages, the turns a bot stored for them, and where
    each stored customer turn sits in the stream."""

    rows: list[tuple[str, str]]  # (text, gold label), stream order
    turns: list[dict[str, Any]]  # user and bot turns, oldest first, as bot/sessions.py stores them
    position: dict[int, int]  # a customer turn's seq -> its message's stream position
    margins: np.ndarray  # each message's margin under the serving model that met it

    @property
    def texts(self) -> list[str]:
        return [text for text, _label in self.rows]


class CachedHeadBackend:
    """A bundle's head on cached frozen-base vectors: bot.classifier's ClassifierBackend for `head` bundles."""

    name = "torch-cached"

    def __init__(self, bundle_path: Path, cache: EmbeddingCache, encoder: Encoder):
        bundle = bundle_mod.load(bundle_path)
        settings = bundle.manifest.head
        self.head = IntentHead(encoder.dim, len(bundle.labels), hidden=settings.hidden, dropout=settings.dropout,
                               scale=settings.scale).eval()
        self.head.load_state_dict(load_file(str(bundle.path / "head.safetensors")))
        self.cache, self.encoder, self.bundle = cache, encoder, bundle

    def embed_and_logits(self, texts, *, batch_size: int = 64):
        embeddings, _computed = self.cache.embed(self.encoder, texts, progress=False)
        with torch.inference_mode():
            return embeddings, self.head(embeddings)


def classifier_of(bundle_path: Path, cache: EmbeddingCache, encoder: Encoder) -> IntentClassifier:
    backend = CachedHeadBackend(bundle_path, cache, encoder)
    return IntentClassifier(backend.bundle, backend)


def accuracy(classifier: IntentClassifier, test) -> float:
    logits = classifier.logits(list(test["text"]))
    predicted = [classifier.labels[i] for i in logits.argmax(dim=-1).tolist()]
    return float(np.mean([p == gold for p, gold in zip(predicted, test["label"])]))


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def train_on(rows: list[tuple[str, str]], seed: int, folder: Path, name: str) -> Path:
    spec = write_csv(folder / f"{name}.csv", rows)
    cfg = load_config(None, [f"data={spec}", f"output={folder / name}", f"seed={seed}", "onnx=false"])
    return train(cfg, progress=False, log=lambda _m: None).bundle.path


def stream_turns(classifier: IntentClassifier, texts: list[str]) -> tuple[list[dict[str, Any]], dict[int, int], np.ndarray]:
    """The turns a live bot stores for these first messages (user turn, then the bot's turn; one session
    each), the customer turns' seq -> stream position, and each message's margin (top-1 minus top-2)."""
    predictions = classifier.predict(texts, top_k=2)
    top1 = np.array([p.confidence for p in predictions])
    top2 = np.array([p.ranking[1][1] if len(p.ranking) > 1 else 0.0 for p in predictions])
    actions = decide(top1, top2, classifier.confidence_floor, classifier.ambiguity_gap)
    turns: list[dict[str, Any]] = []
    position: dict[int, int] = {}
    seq = itertools.count(1)
    for i, (text, prediction, action) in enumerate(zip(texts, predictions, actions)):
        common = {"session_id": f"stream-{i}", "intent": prediction.label, "confidence": prediction.confidence,
                  "action": str(action), "model_version": classifier.version, "at": f"2026-01-01T00:00:00.{i:04d}"}
        user = next(seq)
        position[user] = i
        turns.append({"seq": user, "role": "user", "text": text, "metadata": {}, **common})
        turns.append({"seq": next(seq), "role": "bot", "text": "...", "metadata": {"reason": "simulated"}, **common})
    return turns, position, np.array([p.margin for p in predictions])


def make_stream(rows: list[tuple[str, str]], classifier: IntentClassifier, seed: int, size: int) -> Stream:
    """`size` of `rows` (seeded), met by `classifier` as a live bot meets first messages."""
    sample = random.Random(seed).sample(rows, size)
    turns, position, margins = stream_turns(classifier, [text for text, _label in sample])
    return Stream(sample, turns, position, margins)


def few_shot_rows(train_rows: list[tuple[str, str]], shots: int, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(the serving model's `shots` examples per intent, the train rows left for the stream), seeded."""
    from datasets import Dataset

    dataset = Dataset.from_dict({"text": [t for t, _ in train_rows], "label": [label for _, label in train_rows]})
    picked = data.few_shot(dataset, shots, seed)
    taken = set(picked["text"])
    return list(zip(picked["text"], picked["label"])), [(t, label) for t, label in train_rows if t not in taken]


def queue_info(classifier: IntentClassifier, stream: Stream, similarity: float) -> dict[str, int]:
    """What the first round's review queue looked like."""
    queue = build_queue(stream.turns, classifier, similarity=similarity, max_items=len(stream.turns))
    reasons = [item.reason for item in queue.items]
    return {"queued": len(queue.items), "groups": queue.groups, "fallback": reasons.count("fallback"),
            "clarify": reasons.count("clarify"), "low_margin": reasons.count("low_margin")}


def stream_margins(classifier: IntentClassifier, texts: list[str]) -> np.ndarray:
    """Every stream message's margin under this model (the serving one of the round)."""
    return margins_of(classifier, texts)[1]


def fill_by_margin(chosen: list[int], margins: np.ndarray, k: int, taken: Sequence[int]) -> list[int]:
    """`chosen`, then the unlabelled stream messages with the smallest margin, up to k new ones."""
    seen = set(taken) | set(chosen)
    rest = [int(i) for i in np.argsort(margins, kind="stable") if int(i) not in seen]
    return (chosen + rest)[:k]


def walk_queue(classifier: IntentClassifier, stream: Stream, taken: Sequence[int], k: int, order: str,
               similarity: float = SIMILARITY) -> list[int]:
    """The next k stream positions a reviewer labels, walking the review queue as the product lists it now.

    The queue is built from the stored turns as the product builds it (`bot.review.build_queue`: the
    labelled texts leave it, margins measured again by the serving model) and walked in
    `Queue.listed(order)`, the order the page, the API and `supportbot review --order` show. A label
    is one message labelled: labelling a whole group in one action still costs one label per member,
    as it adds one training example per member. When the queue runs out, the rest are the unlabelled
    messages with the smallest margin."""
    texts = stream.texts
    done = set(taken)
    queue = build_queue(stream.turns, classifier, similarity=similarity, labelled=[texts[i] for i in taken],
                        max_items=len(texts))
    positions = (stream.position[item.id] for item in queue.listed(order))
    chosen = [p for p in positions if p not in done][:k]
    if len(chosen) < k:
        chosen = fill_by_margin(chosen, stream_margins(classifier, texts), k, taken)
    return chosen


Pick = Callable[[IntentClassifier, list[int], int], list[int]]


def in_rounds(pick: Pick, classifier: IntentClassifier, retrain: Callable[[list[int]], IntentClassifier],
              rounds: int, budget: int) -> list[int]:
    """`budget` labels in `rounds` equal rounds with a retrain between them: the product's label ->
    `supportbot retrain` -> promote loop, each round's queue ranked by the model the last round promoted.
    pick(serving model, labelled so far, k) -> k new stream positions. The last round's retrain is the
    arm's final model, trained by the caller like every arm's."""
    chosen: list[int] = []
    for r in range(rounds):
        if r:
            classifier = retrain(chosen)
        k = budget * (r + 1) // rounds - len(chosen)
        new = pick(classifier, chosen, k)
        if len(new) != k or set(new) & set(chosen):
            raise RuntimeError(f"round {r + 1}: {len(new)} picks for {k} labels, or a message labelled twice")
        chosen += new
    return chosen


def by_intent(margins: np.ndarray, predicted: list[str], budget: int) -> list[int]:
    """Uncertainty with diversity over the model's intents: round-robin over the predicted intents
    (the intent whose least certain message is least certain first), each intent's smallest margin first."""
    queues: dict[str, list[int]] = {}
    for i in np.argsort(margins):
        queues.setdefault(predicted[int(i)], []).append(int(i))
    order = sorted((rank, margins[members[0]], i) for members in queues.values() for rank, i in enumerate(members))
    return [i for _rank, _first, i in order][:budget]


def run_seed(seed: int, protocol: Protocol, train_rows: list[tuple[str, str]], test: Any, folder: Path,
             cache: EmbeddingCache, encoder: Encoder) -> dict[str, Any]:
    seed_rows, pool = few_shot_rows(train_rows, protocol.shots, seed)
    base = train_on(seed_rows, seed, folder, f"base-{seed}")
    classifier = classifier_of(base, cache, encoder)
    results: dict[str, Any] = {"base": accuracy(classifier, test)}
    stream = make_stream(pool, classifier, seed, protocol.stream)
    results["queue_info"] = queue_info(classifier, stream, protocol.similarity)
    predicted = [turn["intent"] for turn in stream.turns if turn["role"] == "user"]

    def retrain(chosen: list[int]) -> IntentClassifier:
        rows = seed_rows + [stream.rows[i] for i in chosen]
        return classifier_of(train_on(rows, seed, folder, f"round-{seed}-{len(chosen)}"), cache, encoder)

    def walk(clf: IntentClassifier, taken: list[int], k: int) -> list[int]:
        return walk_queue(clf, stream, taken, k, protocol.order, protocol.similarity)

    budget = protocol.budget
    picks: dict[str, Callable[[], list[int]]] = {
        "queue": lambda: in_rounds(walk, classifier, retrain, protocol.rounds, budget),
        "margin": lambda: [int(i) for i in np.argsort(stream.margins)[:budget]],
        "random": lambda: random_draw(seed, 0, len(stream.rows), budget),
        "margin_by_intent": lambda: by_intent(stream.margins, predicted, budget),
    }
    for arm in protocol.arms:
        chosen = picks[arm]()
        if len(set(chosen)) != budget:
            raise RuntimeError(f"arm {arm}: {len(set(chosen))} messages labelled, not {budget}")
        bundle = train_on(seed_rows + [stream.rows[i] for i in chosen], seed, folder, f"{arm}-{seed}")
        results[arm] = accuracy(classifier_of(bundle, cache, encoder), test)
        print(f"  seed {seed} {arm}: {100 * float(results[arm]):.2f}%", flush=True)
    if "random" in protocol.arms and protocol.random_draws > 1:
        # the random arm's expected accuracy: its first draw (above) and more, each retrained the same way
        draws = [float(results["random"])]
        for draw in range(1, protocol.random_draws):
            chosen = random_draw(seed, draw, len(stream.rows), budget)
            bundle = train_on(seed_rows + [stream.rows[i] for i in chosen], seed, folder, f"random{draw}-{seed}")
            draws.append(accuracy(classifier_of(bundle, cache, encoder), test))
            print(f"  seed {seed} random draw {draw}: {100 * draws[-1]:.2f}%", flush=True)
        results["random_draws"] = draws
        results["random_mean"] = statistics.mean(draws)
    return results


def random_draw(seed: int, draw: int, size: int, budget: int) -> list[int]:
    """The random arm's messages: draw 0 is the seed's own draw (the arm as first reported); the others are
    further independent draws, for the arm's expected accuracy."""
    return random.Random(seed if draw == 0 else f"{seed}-{draw}").sample(range(size), budget)


def load_banking(max_length: int = MAX_LENGTH) -> tuple[list[tuple[str, str]], Any, Encoder, EmbeddingCache]:
    """BANKING77's train rows, its test split, the frozen base and the embedding cache, every text embedded once."""
    splits = data.load(BANKING)
    train_rows = list(zip(splits["train"]["text"], splits["train"]["label"]))
    encoder = Encoder.load(DEFAULT_BASE, max_length=max_length)
    cache = EmbeddingCache(default_cache_dir(), base_weights_sha256(resolve_base(DEFAULT_BASE)), max_length)
    cache.embed(encoder, [t for t, _ in train_rows] + list(splits["test"]["text"]), progress=True)
    return train_rows, splits["test"], encoder, cache


def report(protocol: Protocol, seeds: list[int], per_seed: dict[int, dict[str, Any]], test_size: int) -> str:
    def cell(arm: str) -> str:
        values = [100 * float(per_seed[s][arm]) for s in seeds]
        return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")

    budget = protocol.budget
    gains = [100 * (float(per_seed[s]["queue"]) - float(per_seed[s]["random"])) for s in seeds]
    draws = protocol.random_draws
    expected = [] if draws == 1 else [
        f"| {budget} at random, the mean of {draws} draws per seed (the draw above and {draws - 1} more) "
        f"| {cell('random_mean')} |"]
    mean_gains = [100 * (float(per_seed[s]["queue"]) - float(per_seed[s]["random_mean"])) for s in seeds] if expected else []
    lines = [
        f"BANKING77: a {protocol.shots}-shot `head` model (seed s), {protocol.stream:,} other train messages as the "
        f"live stream, {budget} of them labelled, retrained, top-1 accuracy on the full test split ({test_size:,}); "
        f"seeds {', '.join(map(str, seeds))} (mean ± sd, %).",
        "",
        "| labelled | test accuracy (%) |",
        "|---|---:|",
        f"| none (the {protocol.shots}-shot model) | {cell('base')} |",
        f"| {budget} from the review queue: {protocol.rounds} rounds, its `{protocol.order}` order, retrained "
        f"between rounds | {cell('queue')} |",
        f"| {budget} with the smallest margin (no grouping) | {cell('margin')} |",
        f"| {budget} at random | {cell('random')} |",
        *expected,
        "",
        "queue - random per seed: " + ", ".join(f"seed {s}: {g:+.2f}" for s, g in zip(seeds, gains))
        + f" (mean {statistics.mean(gains):+.2f} points).",
        *([] if not expected else [
            f"queue - the mean of {draws} random draws per seed: "
            + ", ".join(f"seed {s}: {g:+.2f}" for s, g in zip(seeds, mean_gains))
            + f" (mean {statistics.mean(mean_gains):+.2f} points); each seed's draws: "
            + "; ".join(f"seed {s}: " + ", ".join(f"{100 * float(a):.2f}" for a in per_seed[s]["random_draws"])
                        for s in seeds) + "."]),
        "The queue per seed: " + "; ".join(
            f"seed {s}: {q['queued']} queued ({q['fallback']} fallback, {q['clarify']} clarify, {q['low_margin']} "
            f"low margin) in {q['groups']} groups at the first round" for s in seeds for q in [per_seed[s]["queue_info"]]),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--arms", nargs="+", choices=ARMS, help="run only these arms (default: queue, margin, "
                        "random); a partial run prints its per-seed lines and records nothing")
    parser.add_argument("--rounds", type=int, default=Protocol.rounds, help="labelling rounds of the queue arm, "
                        "a retrain between them (default 3: 3 x 100)")
    parser.add_argument("--order", choices=ORDERS, default=Protocol.order,
                        help=f"the queue's listed order the queue arm walks (default {Protocol.order})")
    parser.add_argument("--random-draws", type=int, default=Protocol.random_draws, metavar="N",
                        help="draws of the random arm per seed (default 1); with more, the report adds their mean "
                        "accuracy, the random arm's expected figure, and the queue's lead over it")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.random_draws < 1:
        parser.error("--random-draws must be at least 1")
    protocol = Protocol(rounds=args.rounds, order=args.order, arms=tuple(args.arms or DEFAULT_ARMS),
                        random_draws=args.random_draws)

    train_rows, test, encoder, cache = load_banking()
    per_seed = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            per_seed[seed] = run_seed(seed, protocol, train_rows, test, Path(tmp), cache, encoder)
            print(f"seed {seed}: {per_seed[seed]}", flush=True)
    if args.arms:  # a partial run: the per-seed lines above are its result
        return
    text = report(protocol, args.seeds, per_seed, len(test))
    print(text)
    if not args.no_record:
        append_section("Active learning: review queue vs random labelling (BANKING77)", command_line("bench/bench_active.py"),
                       text)


if __name__ == "__main__":
    main()
