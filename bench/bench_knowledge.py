"""Knowledge answers: retrieval quality (frozen questions, the learned question map, known questions as
extra keys, dense + BM25, LoRA-adapted passages) and retrieval speed.

    python bench/bench_knowledge.py --model models/default                 # quality and speed
    python bench/bench_knowledge.py --model models/default --adapter       # + the retrieval adapter (minutes)
    python bench/bench_knowledge.py --model models/default --no-record     # print only

Quality, on the questions of the knowledge folder the bundle was trained with (or --knowledge DIR).
Every variant scores articles (an article scores its best passage, plus w x its best known
question where named), from the query vectors of the intent pass; its floor (and, where named, its
margin: the least lead over the runner-up article) is fitted on validation.yaml exactly as training
fits it, and the table shows the validation utility of that fit (right - cost x wrong: the basis of
every choice) next to the test.yaml figures (recall@1/@3, MRR; at the floor: answered-right,
answered-wrong, abstention on unanswerable). Variants: the bundle's passages with the questions as
the encoder made them; passages + w x BM25 (rank-bm25, scores divided by the query's best, w chosen
on validation); the question map learned from train.yaml (finetune/knowledge_train.py
`train_question_map`); the map with train.yaml's questions as known questions of their article
(through the map), weighted 0.25 / the bundle's weight / 1, or as a max instead of a sum; the
bundle's own `article_scores` (what `supportbot train` serves); the served recipe over --draws rounding
draws (the question map relearned from train.yaml's vectors plus noise of 1e-6, floor and margin
refitted: one training is one draw of what a CPU's rounding gives); with --adapter, passages embedded by
a LoRA adapter trained on train.yaml (`train_passage_adapter`, in PyTorch whatever the bundle's
serving backend), alone, with the map, and with the map and the known questions. (A learned
answer-or-abstain rule was measured here at commit bd22cc4 and not kept: BENCHMARKS.md, History.)

Speed: one process, the shop pack's test messages one at a time: the intent pass
(`IntentClassifier.predict([text])`) and retrieval over 5,000 passages (the bundle's passages
repeated with noise, unit rows; through the bundle's question map when it has one) from the vector
the intent pass made, timed in alternation; p50 of each and their ratio. Retrieval is timed as a server
loads it (scores in the arithmetic `fastest_dtype` measures as faster on this CPU) and with float32 and
float16 forced: one arithmetic at a time over every message, in two rounds. Appends a section to BENCHMARKS.md unless --no-record.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

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
from bot.knowledge import SCORE_DTYPES, KnowledgeBase, Question, map_questions, read_questions  # noqa: E402
from finetune import knowledge_train as kt  # noqa: E402
from finetune.config import QuestionMapConfig  # noqa: E402

KEYS = ("recall_at_1", "recall_at_3", "mrr", "answered_right", "answered_wrong", "abstained", "unanswerable_abstained")
WEIGHTS = (0.02, 0.05, 0.1, 0.2, 0.3)


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def utility(figures: dict[str, float], cost: float) -> float:
    """right - cost x wrong, in questions: the figure every floor, margin and choice maximises."""
    n, n_un = figures["n_answerable"], figures["n_unanswerable"]
    return (figures["answered_right"] - cost * figures["answered_wrong"]) * n - cost * (1 - figures["unanswerable_abstained"]) * n_un


def scored(name: str, val: torch.Tensor, test: torch.Tensor, articles: list[str], qs: dict[str, list[Question]],
           cost: float, margin: bool) -> dict[str, float | str]:
    """Floor (and margin) fitted on validation; the validation utility it reaches; the test figures."""
    fit = kt.fit_floor(val, articles, qs["validation"], cost, margin=margin)
    floor, lead = fit.floor, fit.margin
    fitted = kt.retrieval_metrics(val, articles, qs["validation"], floor, lead)
    test_figures = kt.retrieval_metrics(test, articles, qs["test"], floor, lead)
    return {"variant": name, "val_utility": utility(fitted, cost), "val_recall_at_1": fitted["recall_at_1"],
            **{k: v for k, v in test_figures.items() if k in KEYS}, "floor": floor, "margin": lead}


def best_known(rows: torch.Tensor, keys: torch.Tensor, columns: torch.Tensor, n_articles: int) -> torch.Tensor:
    """(queries, articles): each article's best known question's score (0 for an article without any)."""
    return torch.zeros(rows.shape[0], n_articles).scatter_reduce(1, columns.expand(rows.shape[0], -1), rows @ keys.T,
                                                                 "amax", include_self=False)


Row = dict[str, float | str]


def quality(classifier: IntentClassifier, base: KnowledgeBase, folder: Path, adapter: bool) -> tuple[list[Row], list[Row]]:
    """Every variant from the same query vectors (the intent pass's), article-level scores, chosen on validation;
    and the bundle's own rules (floor alone, floor + margin) cross-validated on its served validation scores."""
    slugs = sorted({p.article for p in base.passages})
    qs = {split: read_questions(folder / "questions" / f"{split}.yaml", slugs) for split in ("validation", "test")}
    train = read_questions(folder / "questions" / "train.yaml", slugs)
    known = [q for q in train if q.article is not None]
    cost = float(base.meta.get("wrong_answer_cost", 3.0))
    query = {split: classifier.embed_and_logits([q.text for q in qs[split]])[0] for split in qs}
    # known questions are embedded as build() embeds them: as messages
    keys = classifier.embed_and_logits([q.text for q in known])[0]
    arts = base.articles
    key_columns = torch.tensor([arts.index(str(q.article)) for q in known])
    settings = QuestionMapConfig(**{k: v for k, v in (base.meta.get("question_map") or {}).items()
                                    if k in QuestionMapConfig.model_fields})
    weight = base.key_weight if base.key_articles else 0.5

    def dense(split: str, vectors: torch.Tensor, w: float = 0.0, question_map: torch.Tensor | None = None,
              combine: str = "sum") -> torch.Tensor:
        """Article scores: best passage (+ w x best known question; `combine="max"`: the better of the two)."""
        rows = query[split] if question_map is None else map_questions(query[split], question_map)
        passages = base.aggregate(rows @ vectors.T)
        if not w and combine == "sum":
            return passages
        key_rows = keys if question_map is None else map_questions(keys, question_map)
        best = best_known(rows, key_rows, key_columns, len(arts))
        return torch.maximum(passages, best) if combine == "max" else passages + w * best

    def variant(name: str, margin: bool = True, *, vectors: torch.Tensor, w: float = 0.0,
                question_map: torch.Tensor | None = None, combine: str = "sum") -> dict[str, float | str]:
        val, test = (dense(split, vectors, w, question_map, combine) for split in ("validation", "test"))
        return scored(name, val, test, arts, qs, cost, margin)

    rows = [variant("frozen questions, floor", False, vectors=base.vectors),
            variant("frozen questions, floor + margin", vectors=base.vectors),
            variant(f"frozen questions + known questions x {weight:g}, floor + margin", vectors=base.vectors, w=weight)]

    from rank_bm25 import BM25Okapi

    bm25 = BM25Okapi([_tokens(p.context_text) for p in base.passages])

    def lexical(split: str) -> torch.Tensor:
        raw = torch.tensor(np.array([bm25.get_scores(_tokens(q.text)) for q in qs[split]]), dtype=torch.float32)
        return raw / raw.max(dim=1, keepdim=True).values.clamp(min=1e-9)

    lex = {split: lexical(split) for split in qs}

    def hybrid(split: str, w: float) -> torch.Tensor:
        return base.aggregate(query[split] @ base.vectors.T + w * lex[split])

    best_w = max(WEIGHTS, key=lambda w: kt.retrieval_metrics(hybrid("validation", w), arts, qs["validation"], 0.0)["recall_at_1"])
    rows.append(scored(f"frozen questions, passages + {best_w:g} x BM25, floor", hybrid("validation", best_w),
                       hybrid("test", best_w), arts, qs, cost, False))
    if base.question_map is not None:  # score exactly the map the bundle serves
        question_map, seconds = base.question_map, float(base.meta["question_map"]["seconds"])
    else:
        started = time.perf_counter()
        question_map = kt.train_question_map(keys, [str(q.article) for q in known], base.passages, base.vectors, settings)
        seconds = time.perf_counter() - started
    label = f"question map ({len(known)} questions, learned in {seconds:.0f} s)"
    rows += [variant(label + ", floor", False, vectors=base.vectors, question_map=question_map),
             variant(label + ", floor + margin", vectors=base.vectors, question_map=question_map)]
    rows += [variant(f"question map + known questions x {weight:g}, floor", False, vectors=base.vectors, w=weight,
                     question_map=question_map),
             variant(f"question map + known questions x {weight:g}, floor + margin", vectors=base.vectors, w=weight,
                     question_map=question_map)]
    rows += [variant(f"question map + known questions x {w:g}, floor + margin", vectors=base.vectors, w=w,
                     question_map=question_map) for w in (0.25, 1.0) if w != weight]
    rows.append(variant("question map + known questions, the better of passage and question (max), floor + margin",
                        vectors=base.vectors, w=1.0, question_map=question_map, combine="max"))
    served = {split: base.article_scores(query[split]) for split in qs}  # the bundle's own code (half precision)
    rules: list[Row] = [{"rule": name, "questions": len(qs["validation"]),
                         **kt.cross_validated(served["validation"], arts, qs["validation"], cost, margin=margin)}
                        for name, margin in (("floor alone", False), ("floor + margin", True))]
    if base.key_articles:
        rows.append(scored("**served by this bundle**, floor + margin", served["validation"], served["test"], arts, qs,
                           cost, True))
        # the sentence reranker at other weights (0: none), through the same served code
        for w in (0.0, 0.25, 0.5, 1.0):
            if w != base.sentence_weight:
                other = replace(base, sentence_weight=w)
                scores = {split: other.article_scores(query[split]) for split in qs}
                name = (f"served scoring, the best {base.rerank} articles reranked by {w:g} x their best sentence"
                        if w else "served scoring without the sentence reranker")
                rows.append(scored(name + ", floor + margin", scores["validation"], scores["test"], arts, qs, cost, True))
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
        rows.append(variant(label + ", floor + margin", vectors=vectors))
        adapted = kt.train_question_map(keys, [str(q.article) for q in known], base.passages, vectors, settings)
        rows.append(variant("LoRA passages + question map, floor + margin", vectors=vectors, question_map=adapted))
        rows.append(variant(f"LoRA passages + question map + known questions x {weight:g}, floor + margin",
                            vectors=vectors, w=weight, question_map=adapted))
    return rows, rules


def rounding_draws(classifier: IntentClassifier, base: KnowledgeBase, folder: Path, n: int,
                   eps_values: list[float]) -> list[Row]:
    """The served recipe again, the question map relearned from train.yaml's vectors plus Gaussian noise of
    1e-6 (draw 0: none), about how far two CPUs' float32 kernels set the same text apart; the known questions
    through each map, the floor and margin refitted on validation as training fits them, scored on test.
    Without this, one bundle is one draw: the figures of a single training are what one CPU's rounding gave."""
    slugs = sorted({p.article for p in base.passages})
    qs = {split: read_questions(folder / "questions" / f"{split}.yaml", slugs) for split in ("validation", "test")}
    known = kt._train_questions(folder, slugs)
    if base.question_map is None or [str(q.article) for q in known] != list(base.key_articles):
        return []
    cost = float(base.meta.get("wrong_answer_cost", 3.0))
    vectors = {split: classifier.embed_and_logits([q.text for q in qs[split]])[0] for split in qs}
    clean = classifier.embed_and_logits([q.text for q in known])[0].float()
    settings = QuestionMapConfig(**{k: v for k, v in (base.meta.get("question_map") or {}).items()
                                    if k in QuestionMapConfig.model_fields})
    # a margin was weighed when training (`knowledge.fit_margin`) if the bundle carries one or the evidence
    # for dropping it (validation.held_out)
    weighs_margin = base.margin > 0 or bool((base.meta.get("validation") or {}).get("held_out"))
    out: list[Row] = []
    for eps in eps_values:
        for draw in range(n):
            noisy = clean + (1e-6 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(draw)) if draw else 0)
            question_map = kt.train_question_map(noisy, [str(q.article) for q in known], base.passages, base.vectors,
                                                 settings.model_copy(update={"eps": eps}))
            keys = map_questions(noisy, question_map).to(torch.float16).float()  # stored in float16, as build() stores them
            redrawn = replace(base, question_map=question_map, keys=keys, score_dtype=torch.float32)
            val, test = (redrawn.article_scores(vectors[split]) for split in ("validation", "test"))
            fit = kt.fit_floor(val, redrawn.articles, qs["validation"], cost, margin=weighs_margin)
            figures = kt.retrieval_metrics(test, redrawn.articles, qs["test"], fit.floor, fit.margin)
            held_out = fit.held_out.get("floor + margin", {}).get("utility", float("nan"))
            out.append({"eps": eps, "draw": draw, "floor": fit.floor, "margin": fit.margin, "val_cv_utility": held_out,
                        **{k: figures[k] for k in ("recall_at_1", "answered_right", "answered_wrong", "unanswerable_abstained")}})
            print(f"draw {draw} (Adam eps {eps:g}): floor {fit.floor:.4f}, margin {fit.margin:.4f}, "
                  f"test answered and right {figures['answered_right']:.4f}", flush=True)
    return out


def draws_table(draws: list[Row], n: int) -> str:
    """Mean ± sd over the draws, per Adam epsilon."""
    lines = [f"The served recipe over {n} rounding draws (the question map relearned from train.yaml's vectors + "
             "N(0, 1e-6), draw 0 without noise; floor and margin refitted on validation; test.yaml scored), by the map's "
             "Adam epsilon (`knowledge.question_map.eps`); mean ± sd (min-max):", "",
             "| Adam eps | floor | margin | validation utility, cross-validated | recall@1 | answered and right | "
             "answered wrong | unanswerable uncited |", "|---|---|---|---|---|---|---|---|"]

    def cell(rows: list[Row], key: str, pct: bool = False) -> str:
        values = [float(r[key]) * (100 if pct else 1) for r in rows]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        digits = 1 if pct or key == "val_cv_utility" else 4
        return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    for eps in dict.fromkeys(float(r["eps"]) for r in draws):
        rows = [r for r in draws if float(r["eps"]) == eps]
        lines.append(f"| {eps:g} | {cell(rows, 'floor')} | {cell(rows, 'margin')} | {cell(rows, 'val_cv_utility')} | "
                     f"{cell(rows, 'recall_at_1', True)} | {cell(rows, 'answered_right', True)} | "
                     f"{cell(rows, 'answered_wrong', True)} | {cell(rows, 'unanswerable_abstained', True)} |")
    return "\n".join(lines)


def rules_table(rules: list[Row]) -> str:
    lines = [f"The served scores' answer-or-abstain rules, cross-validated on the {rules[0]['questions']} validation questions alone "
             "(`finetune/knowledge_train.py` `cross_validated`: fitted on 4/5, scored on the held-out 1/5; the same 10 "
             "shuffles of 5 folds for both rules; test not read). Training keeps the margin only when its utility here is "
             "higher:", "",
             "| rule | held-out answered and right | answered wrong | unanswerable cited | utility, mean ± sd |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['rule']} | {100 * float(r['answered_right']):.1f}% | {100 * float(r['answered_wrong']):.1f}% "
              f"| {100 * float(r['unanswerable_cited']):.1f}% | {float(r['utility']):.1f} ± {float(r['utility_sd']):.1f} |"
              for r in rules]
    return "\n".join(lines)


def speed(classifier: IntentClassifier, base: KnowledgeBase, n_passages: int, repeats: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    rows = base.vectors[torch.arange(n_passages) % len(base.passages)]
    vectors = F.normalize(rows + 0.05 * torch.randn(rows.shape, generator=generator), dim=1)
    passages = [replace(base.passages[i % len(base.passages)], id=f"p{i}") for i in range(n_passages)]
    starts = np.cumsum([0] + [len(p.sentences) for p in base.passages])  # each passage's sentence rows
    sentence_rows = torch.from_numpy(np.concatenate(
        [np.arange(starts[i % len(base.passages)], starts[i % len(base.passages) + 1]) for i in range(n_passages)]))
    sentences = base.sentence_vectors[sentence_rows]  # the reranker reads each article's sentences
    keys = base.keys if base.keys is not None else torch.zeros(0, vectors.shape[1])
    # as a server loads it (the arithmetic measured here, `fastest_dtype`), then each arithmetic forced
    bases = {dtype: KnowledgeBase(passages, vectors, sentences, base.floor, keys=keys, key_articles=base.key_articles,
                                  key_weight=base.key_weight, margin=base.margin, question_map=base.question_map,
                                  sentence_weight=base.sentence_weight, rerank=base.rerank, score_dtype=dtype)
             for dtype in (None, *SCORE_DTYPES)}
    chosen = bases[None].score_dtype
    texts = shop_messages()[:repeats]
    intent_ms: list[float] = []
    retrieval_ms: dict[torch.dtype | None, list[float]] = {dtype: [] for dtype in bases}
    for text in texts[:10]:  # warm-up
        for big in bases.values():
            big.best(classifier.predict([text])[0].embedding)
    # one arithmetic at a time over every message (intent pass, then search), as a server holds one knowledge
    # base; two rounds, so a drift of the machine's speed does not fall on one arithmetic alone
    for _ in range(2):
        for dtype, big in bases.items():
            for text in texts:
                started = time.perf_counter()
                prediction = classifier.predict([text])[0]
                middle = time.perf_counter()
                big.best(prediction.embedding)
                done = time.perf_counter()
                if dtype is None:
                    intent_ms.append((middle - started) * 1000)
                retrieval_ms[dtype].append((done - middle) * 1000)
    intent = statistics.median(intent_ms)
    p50 = {dtype: statistics.median(times) for dtype, times in retrieval_ms.items()}
    return {"messages": len(texts), "passages": n_passages, "intent_p50_ms": intent, "retrieval_p50_ms": p50[None],
            "ratio": p50[None] / intent, "chosen": str(chosen).removeprefix("torch."),
            "by_dtype": {str(d).removeprefix("torch."): p50[d] for d in SCORE_DTYPES}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a bundle trained with help-centre articles")
    parser.add_argument("--knowledge", help="the articles' folder with questions/ (default: the shop pack's)")
    parser.add_argument("--passages", type=int, default=5000, help="passages for the speed test (default 5000)")
    parser.add_argument("--messages", type=int, default=300, help="messages timed (default 300)")
    parser.add_argument("--adapter", action="store_true", help="also train and score the LoRA retrieval adapter (minutes)")
    parser.add_argument("--draws", type=int, default=5,
                        help="rounding draws of the served recipe (question map relearned from vectors + 1e-6 noise, "
                             "floor and margin refitted): mean ± sd of the test figures (default 5; 0: none)")
    parser.add_argument("--draw-eps", type=float, nargs="+",
                        help="the question map's Adam epsilon for the draws, one row each (default: the bundle's)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    parser.add_argument("--note", default="", help="a note for the record (e.g. 'measured under load')")
    args = parser.parse_args()

    classifier = IntentClassifier.from_bundle(args.model)
    base = KnowledgeBase.from_bundle(bundle_mod.load(args.model))
    if base is None:
        parser.error(f"{args.model} has no help-centre articles; train it with --knowledge DIR")
    folder = Path(args.knowledge) if args.knowledge else kt.knowledge_folder("pack:shop", None)
    assert folder is not None
    rows, rules = quality(classifier, base, folder, args.adapter)
    eps_values = args.draw_eps or [float((base.meta.get("question_map") or {}).get("eps", 1e-8))]
    draws = rounding_draws(classifier, base, folder, args.draws, eps_values) if args.draws > 0 else []
    timing = speed(classifier, base, args.passages, args.messages)

    columns = ("val_utility", "val_recall_at_1", *KEYS, "floor", "margin")
    header = "| variant | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    table = header + "".join(
        f"| {r['variant']} | " + " | ".join(f"{float(r[k]):.3f}" for k in columns) + " |\n" for r in rows
    )
    forced = ", ".join(f"{name} {ms:.3f} ms" for name, ms in timing["by_dtype"].items())
    speed_line = (f"Speed: {timing['messages']} messages one at a time, {timing['passages']:,} passages: intent pass p50 "
                  f"{timing['intent_p50_ms']:.2f} ms, retrieval p50 as loaded here (scores in {timing['chosen']}) "
                  f"{timing['retrieval_p50_ms']:.3f} ms (ratio {timing['ratio']:.3f}); each arithmetic forced: {forced}.")
    shown = folder.resolve().relative_to(ROOT) if folder.resolve().is_relative_to(ROOT) else folder
    body = (f"Questions: {shown}/questions (floor, and margin where named, fitted on validation.yaml; val_utility: right "
            f"- cost x wrong on validation at that fit, the basis of every choice; the other columns: test.yaml). "
            f"Served by this bundle: {base.meta.get('retrieval', 'dense, passages')}, margin {base.margin:.3f}.\n\n"
            f"{table}\n{rules_table(rules)}\n\n" + (f"{draws_table(draws, args.draws)}\n\n" if draws else "") + f"{speed_line}\n")
    if args.note:
        body += f"\n{args.note}\n"
    print(body)
    if not args.no_record:
        append_section("Knowledge answers: retrieval quality and speed", command_line("bench/bench_knowledge.py"), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
