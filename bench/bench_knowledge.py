"""Knowledge answers: retrieval quality (frozen questions, the learned question map, dense + BM25, a learned
answer-or-abstain rule, LoRA-adapted passages) and retrieval speed.

    python bench/bench_knowledge.py --model models/default                 # quality and speed
    python bench/bench_knowledge.py --model models/default --adapter       # + the retrieval adapter (minutes)
    python bench/bench_knowledge.py --model models/default --no-record     # print only

Quality, on the questions of the knowledge folder the bundle was trained with (or --knowledge DIR).
Every variant scores articles (an article scores its best passage, or its best known question
where named), from the query vectors of the intent pass; its floor (and, where named, its margin:
the least lead over the runner-up article) is fitted on validation.yaml exactly as training fits
it, and the table shows the validation utility of that fit (right - cost x wrong: the basis of
every choice) next to the test.yaml figures (recall@1/@3, MRR; at the floor: answered-right,
answered-wrong, abstention on unanswerable). Variants: the bundle's passages with the questions as
the encoder made them (floor, floor + margin); train.yaml's questions as extra keys of their
article; passages + w x BM25 (rank-bm25, scores divided by the query's best, w chosen on
validation); the question map learned from train.yaml (finetune/knowledge_train.py
`train_question_map`, what `supportbot train` serves); the question map with a logistic
answer-or-abstain rule instead of the floor and margin (features: top score, leads over the second
and third article, lexical overlap with the cited passage, agreement of the five best passages;
fitted on train.yaml with 5-fold cross-fitting, answering at P(right) >= cost / (1 + cost)); with
--adapter, passages embedded by a LoRA adapter trained on train.yaml (`train_passage_adapter`, in
PyTorch whatever the bundle's serving backend), without and with the question map.

Speed: one process, the shop pack's test messages one at a time: the intent pass
(`IntentClassifier.predict([text])`) and retrieval over 5,000 passages (the bundle's passages
repeated with noise, unit rows; through the bundle's question map when it has one) from the vector
the intent pass made, timed in alternation; p50 of each and their ratio. Appends a section to BENCHMARKS.md unless --no-record.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from supportbot.cli import set_serving_openmp  # noqa: E402

set_serving_openmp()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.bench_serve import shop_messages  # noqa: E402
from bench.record import append_section, command_line  # noqa: E402
from bot import bundle as bundle_mod  # noqa: E402
from bot.classifier import IntentClassifier, TorchBackend  # noqa: E402
from bot.encoder import Encoder  # noqa: E402
from bot.knowledge import KnowledgeBase, Question, read_questions  # noqa: E402
from finetune import knowledge_train as kt  # noqa: E402
from finetune.config import QuestionMapConfig  # noqa: E402

KEYS = ("recall_at_1", "recall_at_3", "mrr", "answered_right", "answered_wrong", "abstained", "unanswerable_abstained")
WEIGHTS = (0.02, 0.05, 0.1, 0.2, 0.3)


STOPWORDS = frozenset([  # left out of the lexical overlap feature
    "a", "an", "the", "i", "my", "me", "to", "of", "for", "and", "or", "in", "on", "is",
    "it", "do", "does", "can", "you", "your", "we", "what", "how", "when", "where", "why", "with", "be",
    "are", "was", "if", "at", "this", "that", "not", "no", "get", "got", "have", "has",
])


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def utility(figures: dict[str, float], cost: float) -> float:
    """right - cost x wrong, in questions: the figure every floor, margin and choice maximises."""
    n, n_un = figures["n_answerable"], figures["n_unanswerable"]
    return (figures["answered_right"] - cost * figures["answered_wrong"]) * n - cost * (1 - figures["unanswerable_abstained"]) * n_un


def scored(name: str, val: torch.Tensor, test: torch.Tensor, articles: list[str], qs: dict[str, list[Question]],
           cost: float, margin: bool) -> dict[str, float | str]:
    """Floor (and margin) fitted on validation; the validation utility it reaches; the test figures."""
    floor, lead = kt.fit_floor(val, articles, qs["validation"], cost, margin=margin)
    fitted = kt.retrieval_metrics(val, articles, qs["validation"], floor, lead)
    test_figures = kt.retrieval_metrics(test, articles, qs["test"], floor, lead)
    return {"variant": name, "val_utility": utility(fitted, cost), "val_recall_at_1": fitted["recall_at_1"],
            **{k: v for k, v in test_figures.items() if k in KEYS}, "floor": floor, "margin": lead}


def mapped(vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return F.normalize(vectors + vectors @ weights, dim=1)


def decision_features(base: KnowledgeBase, queries: torch.Tensor, texts: list[str]) -> tuple[np.ndarray, torch.Tensor]:
    """Per question, what a learned answer-or-abstain rule sees: the top article's score, its lead over the
    second and over the third, the share of the question's content words in the cited passage, and the
    share of the five best passages that belong to the top article; and the article scores."""
    passage_scores = queries @ base.vectors.T
    scores = base.aggregate(passage_scores)
    top = scores.topk(3, dim=1)
    columns = torch.tensor([base.articles.index(p.article) for p in base.passages])
    rows = []
    for i, text in enumerate(texts):
        s1, s2, s3 = top.values[i].tolist()
        article = int(top.indices[i, 0])
        cited = int(passage_scores[i].masked_fill(columns != article, -9.0).argmax())
        words = {w for w in _tokens(text) if w not in STOPWORDS and len(w) > 2}
        overlap = len(words & set(_tokens(base.passages[cited].context_text))) / max(len(words), 1)
        same = float((columns[passage_scores[i].topk(5).indices] == article).float().mean())
        rows.append([s1, s1 - s2, s1 - s3, overlap, same])
    return np.array(rows), scores


def logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, scale, weights with bias last) of an L2-regularised logistic regression fitted by L-BFGS."""
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = torch.tensor((x - mean) / scale, dtype=torch.float32)
    target = torch.tensor(y, dtype=torch.float32)
    weights = torch.zeros(z.shape[1] + 1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ weights[:-1] + weights[-1], target) + l2 * (weights[:-1] ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return mean, scale, weights.detach().numpy()


def learned_decision(name: str, base: KnowledgeBase, train: list[Question], train_vectors: torch.Tensor,
                     qs: dict[str, list[Question]], query: dict[str, torch.Tensor], weights: torch.Tensor,
                     settings: QuestionMapConfig, cost: float, folds: int = 5) -> dict[str, float | str]:
    """A logistic answer-or-abstain rule instead of the floor and margin, fitted on train.yaml with
    cross-fitting (the question map of each fold learned without the fold's questions, so the features
    are out-of-sample as validation's are), answering when P(right) >= cost / (1 + cost)."""
    rng = np.random.default_rng(0)
    fold = rng.integers(0, folds, len(train))
    features, labels = np.zeros((len(train), 5)), np.zeros(len(train))
    for k in range(folds):
        fitting = [i for i, q in enumerate(train) if fold[i] != k and q.article is not None]
        held = [i for i in range(len(train)) if fold[i] == k]
        w = kt.train_question_map(train_vectors[fitting], [str(train[i].article) for i in fitting], base.passages,
                                  base.vectors, settings)
        x, scores = decision_features(base, mapped(train_vectors[held], w), [train[i].text for i in held])
        top = scores.argmax(1).tolist()
        features[held] = x
        labels[held] = [float(train[i].article == base.articles[t]) for i, t in zip(held, top)]
    mean, scale, coef = logistic(features, labels)
    threshold = cost / (1 + cost)
    out: dict[str, float | str] = {"variant": name}
    for split in ("validation", "test"):
        x, scores = decision_features(base, mapped(query[split], weights), [q.text for q in qs[split]])
        probability = 1 / (1 + np.exp(-(((x - mean) / scale) @ coef[:-1] + coef[-1])))
        figures = kt.retrieval_metrics(scores, base.articles, qs[split], 0.0, answered=probability >= threshold)
        if split == "validation":
            out.update(val_utility=utility(figures, cost), val_recall_at_1=figures["recall_at_1"])
        else:
            out.update({k: v for k, v in figures.items() if k in KEYS})
    out.update(floor=threshold, margin=0.0)
    return out


def quality(classifier: IntentClassifier, base: KnowledgeBase, folder: Path, adapter: bool) -> list[dict[str, float | str]]:
    """Every variant from the same query vectors (the intent pass's), article-level scores, chosen on validation."""
    slugs = sorted({p.article for p in base.passages})
    qs = {split: read_questions(folder / "questions" / f"{split}.yaml", slugs) for split in ("validation", "test")}
    train = read_questions(folder / "questions" / "train.yaml", slugs)
    known = [q for q in train if q.article is not None]
    cost = float(base.meta.get("wrong_answer_cost", 3.0))
    query = {split: classifier.embed_and_logits([q.text for q in qs[split]])[0] for split in qs}
    train_vectors = classifier.embed_and_logits([q.text for q in train])[0]  # as build() embeds them: as messages
    keys = train_vectors[[i for i, q in enumerate(train) if q.article is not None]]
    keyed = KnowledgeBase(base.passages, base.vectors, base.sentence_vectors, base.floor,
                          keys=keys, key_articles=tuple(str(q.article) for q in known))
    plain = KnowledgeBase(base.passages, base.vectors, base.sentence_vectors, base.floor)
    arts = keyed.articles
    settings = QuestionMapConfig(**{k: v for k, v in (base.meta.get("question_map") or {}).items()
                                    if k in QuestionMapConfig.model_fields})

    def dense(split: str, vectors: torch.Tensor, with_keys: bool, weights: torch.Tensor | None = None) -> torch.Tensor:
        rows = query[split] if weights is None else mapped(query[split], weights)
        return keyed.aggregate(rows @ vectors.T, rows @ keys.T if with_keys else None)

    rows = []
    for margin in (False, True):
        rows.append(scored("passages, frozen questions" + (", floor + margin" if margin else ", floor"),
                           dense("validation", base.vectors, False), dense("test", base.vectors, False), arts, qs, cost,
                           margin))
    rows.append(scored("passages + train.yaml questions as keys, floor + margin", dense("validation", base.vectors, True),
                       dense("test", base.vectors, True), arts, qs, cost, True))

    from rank_bm25 import BM25Okapi

    bm25 = BM25Okapi([_tokens(p.context_text) for p in base.passages])

    def lexical(split: str) -> torch.Tensor:
        raw = torch.tensor(np.array([bm25.get_scores(_tokens(q.text)) for q in qs[split]]), dtype=torch.float32)
        return raw / raw.max(dim=1, keepdim=True).values.clamp(min=1e-9)

    lex = {split: lexical(split) for split in qs}

    def hybrid(split: str, w: float) -> torch.Tensor:
        return keyed.aggregate(query[split] @ base.vectors.T + w * lex[split])

    best_w = max(WEIGHTS, key=lambda w: kt.retrieval_metrics(hybrid("validation", w), arts, qs["validation"], 0.0)["recall_at_1"])
    rows.append(scored(f"passages + {best_w:g} x BM25, floor", hybrid("validation", best_w), hybrid("test", best_w),
                       arts, qs, cost, False))
    if base.question_map is not None:  # score exactly what the bundle serves
        weights, seconds = base.question_map, float(base.meta["question_map"]["seconds"])
    else:
        started = time.perf_counter()
        weights = kt.train_question_map(keys, [str(q.article) for q in known], base.passages, base.vectors, settings)
        seconds = time.perf_counter() - started
    label = f"question map ({len(known)} questions, learned in {seconds:.0f} s)"
    for margin in (False, True):
        rows.append(scored(label + (", floor + margin" if margin else ", floor"), dense("validation", base.vectors, False, weights),
                           dense("test", base.vectors, False, weights), arts, qs, cost, margin))
    rows.append(learned_decision("question map, learned answer-or-abstain rule (logistic, cross-fitted on train.yaml)",
                                 plain, train, train_vectors, qs, query, weights, settings, cost))
    if adapter:
        torch_backend = IntentClassifier.from_bundle(classifier.bundle.path, backend="torch").backend
        assert isinstance(torch_backend, TorchBackend)
        serving = torch_backend.encoder  # the adapter trains in PyTorch (the default backend may be ONNX Runtime)
        max_tokens = int(base.meta["max_tokens"])
        started = time.perf_counter()
        model = kt.train_passage_adapter(serving.model, serving, base.passages, train,
                                         {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["query", "key", "value", "dense"]},
                                         max_tokens=max_tokens, epochs=2, progress=True)
        seconds = time.perf_counter() - started
        merged = Encoder(model.merge_and_unload(), serving.tokenizer, max_tokens)
        vectors = merged.embed([p.context_text for p in base.passages])
        label = f"LoRA passages (r 8, 2 epochs, {len(known)} questions, {seconds:.0f} s)"
        rows.append(scored(label + ", floor + margin", dense("validation", vectors, False), dense("test", vectors, False),
                           arts, qs, cost, True))
        adapted = kt.train_question_map(keys, [str(q.article) for q in known], base.passages, vectors, settings)
        rows.append(scored("LoRA passages + question map, floor + margin", dense("validation", vectors, False, adapted),
                           dense("test", vectors, False, adapted), arts, qs, cost, True))
    return rows


def speed(classifier: IntentClassifier, base: KnowledgeBase, n_passages: int, repeats: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    rows = base.vectors[torch.arange(n_passages) % len(base.passages)]
    vectors = F.normalize(rows + 0.05 * torch.randn(rows.shape, generator=generator), dim=1)
    passages = [replace(base.passages[i % len(base.passages)], id=f"p{i}", sentences=()) for i in range(n_passages)]
    keys = base.keys if base.keys is not None else torch.zeros(0, vectors.shape[1])
    big = KnowledgeBase(passages, vectors, base.sentence_vectors[:0], base.floor,  # search reads no sentences
                        keys=keys, key_articles=base.key_articles, margin=base.margin, question_map=base.question_map)
    texts = shop_messages()[:repeats]
    intent_ms, retrieval_ms = [], []
    for text in texts[:10]:  # warm-up
        big.best(classifier.predict([text])[0].embedding)
    for text in texts:
        started = time.perf_counter()
        prediction = classifier.predict([text])[0]
        middle = time.perf_counter()
        big.best(prediction.embedding)
        done = time.perf_counter()
        intent_ms.append((middle - started) * 1000)
        retrieval_ms.append((done - middle) * 1000)
    intent, retrieval = statistics.median(intent_ms), statistics.median(retrieval_ms)
    return {"messages": len(texts), "passages": n_passages, "intent_p50_ms": intent, "retrieval_p50_ms": retrieval,
            "ratio": retrieval / intent}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a bundle trained with help-centre articles")
    parser.add_argument("--knowledge", help="the articles' folder with questions/ (default: the shop pack's)")
    parser.add_argument("--passages", type=int, default=5000, help="passages for the speed test (default 5000)")
    parser.add_argument("--messages", type=int, default=300, help="messages timed (default 300)")
    parser.add_argument("--adapter", action="store_true", help="also train and score the LoRA retrieval adapter (minutes)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    parser.add_argument("--note", default="", help="a note for the record (e.g. 'measured under load')")
    args = parser.parse_args()

    classifier = IntentClassifier.from_bundle(args.model)
    base = KnowledgeBase.from_bundle(bundle_mod.load(args.model))
    if base is None:
        parser.error(f"{args.model} has no help-centre articles; train it with --knowledge DIR")
    folder = Path(args.knowledge) if args.knowledge else kt.knowledge_folder("pack:shop", None)
    assert folder is not None
    rows = quality(classifier, base, folder, args.adapter)
    timing = speed(classifier, base, args.passages, args.messages)

    columns = ("val_utility", "val_recall_at_1", *KEYS, "floor", "margin")
    header = "| variant | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    table = header + "".join(
        f"| {r['variant']} | " + " | ".join(f"{float(r[k]):.3f}" for k in columns) + " |\n" for r in rows
    )
    speed_line = (f"Speed: {timing['messages']} messages one at a time, {timing['passages']:,} passages: intent pass p50 "
                  f"{timing['intent_p50_ms']:.2f} ms, retrieval p50 {timing['retrieval_p50_ms']:.3f} ms "
                  f"(ratio {timing['ratio']:.3f}).")
    shown = folder.resolve().relative_to(ROOT) if folder.resolve().is_relative_to(ROOT) else folder
    body = (f"Questions: {shown}/questions (floor, and margin where named, fitted on validation.yaml; val_utility: right "
            f"- cost x wrong on validation at that fit, the basis of every choice; the other columns: test.yaml). "
            f"Served by this bundle: {base.meta.get('retrieval', 'dense, passages')}, margin {base.margin:.3f}.\n\n"
            f"{table}\n{speed_line}\n")
    if args.note:
        body += f"\n{args.note}\n"
    print(body)
    if not args.no_record:
        append_section("Knowledge answers: retrieval quality and speed", command_line("bench/bench_knowledge.py"), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
