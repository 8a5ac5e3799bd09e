"""Offline evaluation: is this model good enough, where does it fail, is it better than production?

`supportbot evaluate --model DIR --data SPEC` scores a bundle through the same inference path
as serving (`IntentClassifier.logits` -> `predictions_from_logits`) and the bot's own dialogue policy
(`bot.policy.DialoguePolicy` around the shared answer / clarify / fallback rule `decide()`), so the
numbers describe the bot a customer would meet.

Every metric in report.json is computed from the per-example records saved as
predictions.jsonl (`build_report`), so a reader can recompute any number from that file.

How out-of-scope data is scored: when the evaluation data holds `oos` examples, a message whose
calibrated top confidence is below the bundle's confidence floor is predicted `oos` (the same rule
as `Prediction.out_of_scope` and the training summary), and accuracy, F1 and the per-intent table
include an `oos` row. Without `oos` examples the prediction is the top intent (closed-set accuracy).
Calibration (ECE) is measured on in-scope examples only: the model has no `oos` probability.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from scipy import stats
from sklearn.metrics import f1_score, precision_recall_fscore_support, roc_auc_score
from tqdm.auto import tqdm

from bot import bundle as bundle_mod
from bot import policy
from bot.bundle import Bundle
from bot.chatbot import load_domain
from bot.classifier import IntentClassifier
from bot.policy import DialoguePolicy
from bot.sessions import SessionState

from . import data
from .config import TrainConfig, recipe_of
from .metrics import ECE_BINS, TOP_K, expected_calibration_error
from .report_model import (
    Comparison,
    CrossValidation,
    DataInfo,
    Delta,
    Evaluation,
    EvaluationReport,
    KnowledgeScores,
    Latency,
    McNemar,
    ModelInfo,
    Record,
    Scores,
)

PREDICT_CHUNK = 256  # texts per progress-bar step; the classifier batches 64 at a time inside
CONFUSED_PAIRS = 10
CURVE_FLOORS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the operating curve's table; the plot sweeps finely
EXACT_MCNEMAR_BELOW = 25  # discordant pairs; below this the exact binomial test replaces chi-squared


# ---- data --------------------------------------------------------------------------------------


def training_split(splits: DatasetDict) -> tuple[str, Dataset]:
    """The split cross-validation folds: train when there is one, else what evaluation would use."""
    return ("train", splits["train"]) if "train" in splits else data.evaluation_split(splits)


# ---- predicting ----------------------------------------------------------------------------------


def predict_records(
    classifier: IntentClassifier, dataset: Dataset, *, open_set: bool, progress: bool, fold: int | None = None
) -> tuple[list[Record], float]:
    """Per-example records for `dataset`, and the seconds the batched prediction took."""
    texts, golds = list(dataset["text"]), list(dataset["label"])
    chunks = []
    with tqdm(total=len(texts), desc="predicting", unit="text", disable=None if progress else True, leave=False) as bar:
        started = time.perf_counter()
        for start in range(0, len(texts), PREDICT_CHUNK):
            chunks.append(classifier.logits(texts[start : start + PREDICT_CHUNK]))
            bar.update(len(chunks[-1]))
        seconds = time.perf_counter() - started
    logits = torch.cat(chunks) if chunks else torch.zeros(0, len(classifier.labels))
    return records_from_logits(classifier, texts, golds, logits, open_set=open_set, fold=fold), seconds


def records_from_logits(
    classifier: IntentClassifier, texts: list[str], golds: list[str], logits: torch.Tensor, *, open_set: bool,
    fold: int | None = None,
) -> list[Record]:
    """One record per text: the serving path's prediction, the bot's action, raw and calibrated confidence.

    The action is what the running bot does with the text as the first message of a conversation:
    `DialoguePolicy.step` (the shared `decide()` rule at the bundle's thresholds, plus the domain's
    handoff intent and its no-clarify-between-small-talk rule).
    """
    predictions = classifier.predictions_from_logits(logits, top_k=TOP_K)
    raw_top = torch.softmax(logits.float(), dim=-1).max(dim=-1).values.tolist()
    rules = DialoguePolicy(load_domain(classifier.bundle), floor=classifier.confidence_floor, gap=classifier.ambiguity_gap)
    records = []
    for i, (text, gold, prediction) in enumerate(zip(texts, golds, predictions)):
        predicted = data.OOS_LABEL if open_set and prediction.out_of_scope else prediction.label
        record = {
            "text": text, "gold": gold, "predicted": predicted, "correct": predicted == gold,
            "confidence": prediction.confidence, "confidence_raw": raw_top[i],
            "top3": [[name, p] for name, p in prediction.ranking],
            "action": rules.step(SessionState(), text, prediction)[0].action,
        }
        if fold is not None:
            record["fold"] = fold
        records.append(record)
    return records


def measure_latency(
    classifier: IntentClassifier, texts: list[str], *, batch_seconds: float, sample_size: int, progress: bool
) -> Latency:
    """Single-text latency on a seeded sample of `sample_size` texts; batched time per text from the full pass."""
    sample = random.Random(0).sample(texts, min(sample_size, len(texts)))
    classifier.predict(sample[:1])  # warm-up: first-call allocations are not what a warm server sees
    timings = []
    for text in tqdm(sample, desc="latency (one text at a time)", unit="text", disable=None if progress else True, leave=False):
        started = time.perf_counter()
        classifier.predict([text])
        timings.append((time.perf_counter() - started) * 1000)
    return Latency(
        single_p50=float(np.percentile(timings, 50)),
        single_p95=float(np.percentile(timings, 95)),
        batch_per_text=batch_seconds * 1000 / max(len(texts), 1),
        single_sample=len(sample),
        batched_texts=len(texts),
        batch_size=64,
        threads=torch.get_num_threads(),
        note=f"single: predict() on one text, {len(sample)} texts sampled (seed 0) after one warm-up call; "
        f"batched: all {len(texts)} texts in batches of 64, wall time / texts",
    )


# ---- metrics (pure functions of the records) -------------------------------------------------


def build_report(records: list[Record], *, worst: int) -> Scores:
    """The metric part of report.json, computed from the records alone."""
    gold = [r["gold"] for r in records]
    predicted = [r["predicted"] for r in records]
    intents = sorted(set(gold))
    correct = np.array([r["correct"] for r in records], dtype=bool)
    return Scores.model_validate({
        "n": len(records),
        "accuracy": float(correct.mean()) if records else 0.0,
        "macro_f1": float(f1_score(gold, predicted, labels=intents, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(gold, predicted, labels=intents, average="weighted", zero_division=0)),
        "top3_accuracy": top3_accuracy(records),
        "per_intent": per_intent(gold, predicted, intents),
        "out_of_scope": out_of_scope(gold, predicted, records),
        "actions": {action: sum(r["action"] == action for r in records) / max(len(records), 1) for action in policy.ACTIONS},
        "answer_accuracy": answer_accuracy(records),
        "calibration": calibration(records),
        "confused_pairs": confused_pairs(gold, predicted),
        "worst_errors": worst_errors(records, worst),
    })


def top3_accuracy(records: list[Record]) -> float:
    """Gold among the top three intents; an `oos` message counts when it was predicted `oos`."""
    hits = [r["gold"] in [name for name, _ in r["top3"]] or (r["gold"] == r["predicted"]) for r in records]
    return float(np.mean(hits)) if hits else 0.0


def per_intent(gold: list[str], predicted: list[str], intents: list[str]) -> dict[str, dict[str, float]]:
    precision, recall, f1, support = precision_recall_fscore_support(gold, predicted, labels=intents, zero_division=0)
    return {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(intents, precision, recall, f1, support)
    }


def out_of_scope(gold: list[str], predicted: list[str], records: list[Record]) -> dict[str, Any] | None:
    """In-scope accuracy, OOS recall / precision, the operating curve and AUROC; None without `oos` examples."""
    gold_a, pred_a = np.array(gold, dtype=object), np.array(predicted, dtype=object)
    is_oos, said_oos = gold_a == data.OOS_LABEL, pred_a == data.OOS_LABEL
    if not is_oos.any():
        return None
    in_scope = ~is_oos
    return {
        "in_scope_accuracy": float((pred_a[in_scope] == gold_a[in_scope]).mean()) if in_scope.any() else 0.0,
        "recall": float(said_oos[is_oos].mean()),
        "precision": float(is_oos[said_oos].mean()) if said_oos.any() else 0.0,
        "n_out_of_scope": int(is_oos.sum()),
        "n_in_scope": int(in_scope.sum()),
        "rule": "predicted oos when the calibrated top confidence is below the bundle's confidence floor",
        "auroc": oos_auroc(records),
        "curve": operating_curve(records),
    }


def operating_curve(records: list[Record], floors: Sequence[float] = CURVE_FLOORS) -> list[dict[str, float]]:
    """In-scope answered-and-right against out-of-scope recall, for each confidence floor.

    answered-and-right: share of in-scope messages whose top confidence reaches the floor and whose
    top intent is the gold one; recall: share of `oos` messages below the floor (the evaluation's rule).
    """
    confidence = np.array([r["confidence"] for r in records], dtype=float)
    is_oos = np.array([r["gold"] == data.OOS_LABEL for r in records], dtype=bool)
    right = np.array([r["top3"][0][0] == r["gold"] for r in records], dtype=bool)
    points = []
    for floor in floors:
        kept = confidence >= floor
        points.append({
            "floor": float(floor),
            "in_scope_answered_right": float((kept & right)[~is_oos].mean()) if (~is_oos).any() else 0.0,
            "oos_recall": float((~kept)[is_oos].mean()) if is_oos.any() else 0.0,
        })
    return points


def oos_auroc(records: list[Record]) -> float | None:
    """AUROC of the top confidence separating in-scope (positive) from `oos` messages; None with one class only."""
    is_in = np.array([r["gold"] != data.OOS_LABEL for r in records], dtype=bool)
    if is_in.all() or not is_in.any():
        return None
    return float(roc_auc_score(is_in, [r["confidence"] for r in records]))


def answer_accuracy(records: list[Record]) -> float | None:
    """Of the messages the bot answers outright, the share whose top intent is the right one."""
    answered = [r for r in records if r["action"] == policy.Action.ANSWER]
    return float(np.mean([r["top3"][0][0] == r["gold"] for r in answered])) if answered else None


def calibration(records: list[Record]) -> dict[str, Any]:
    """ECE (15 equal-width bins) of the raw and the temperature-scaled top confidence, in-scope messages."""
    in_scope = [r for r in records if r["gold"] != data.OOS_LABEL]
    right = np.array([r["top3"][0][0] == r["gold"] for r in in_scope], dtype=float)
    return {
        "ece_raw": expected_calibration_error(np.array([r["confidence_raw"] for r in in_scope]), right, ECE_BINS),
        "ece_calibrated": expected_calibration_error(np.array([r["confidence"] for r in in_scope]), right, ECE_BINS),
        "bins": ECE_BINS,
        "n": len(in_scope),
    }


def confused_pairs(gold: list[str], predicted: list[str], top: int = CONFUSED_PAIRS) -> list[dict[str, Any]]:
    """Intent pairs most often mistaken for each other (both directions added up), most first."""
    directed = Counter((g, p) for g, p in zip(gold, predicted) if g != p)
    pairs: Counter[tuple[str, str]] = Counter()
    for (g, p), count in directed.items():
        first, second = sorted((g, p))
        pairs[(first, second)] += count
    ranked = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))[:top]
    return [
        {"a": a, "b": b, "count": count, "a_predicted_as_b": directed[(a, b)], "b_predicted_as_a": directed[(b, a)]}
        for (a, b), count in ranked
    ]


def worst_errors(records: list[Record], n: int) -> list[dict[str, Any]]:
    """The `n` wrong predictions made with the highest confidence."""
    wrong = sorted((r for r in records if not r["correct"]), key=lambda r: (-r["confidence"], r["text"]))
    keys = ("text", "gold", "predicted", "confidence", "action", "fold")
    return [{k: r[k] for k in keys if k in r} for r in wrong[:n]]


# ---- compare -------------------------------------------------------------------------------------


def mcnemar(model_right: np.ndarray, other_right: np.ndarray) -> McNemar:
    """McNemar's test on paired correctness; exact binomial when discordant pairs are few."""
    b = int((model_right & ~other_right).sum())
    c = int((~model_right & other_right).sum())
    if b + c == 0:
        statistic, p_value, method = 0.0, 1.0, "no discordant pairs"
    elif b + c < EXACT_MCNEMAR_BELOW:
        statistic, p_value, method = float(min(b, c)), float(stats.binomtest(min(b, c), b + c, 0.5).pvalue), "exact binomial"
    else:
        statistic = (abs(b - c) - 1) ** 2 / (b + c)
        p_value, method = float(stats.chi2.sf(statistic, 1)), "chi-squared with continuity correction"
    verdict = "no significant difference (p >= 0.05)"
    if p_value < 0.05:
        verdict = "model is better (p < 0.05)" if b > c else "other is better (p < 0.05)"
    return McNemar(
        model_only_right=b, other_only_right=c, statistic=float(statistic), p_value=p_value, method=method, verdict=verdict
    )


def compare_reports(model: Evaluation, other: Evaluation, other_path: str) -> Comparison:
    """Side by side metrics, McNemar on the paired predictions, per-intent F1 changes (model - other)."""
    a, b = model.report, other.report
    mine, theirs = a.scalar_metrics(), b.scalar_metrics()
    metrics = {key: _delta(mine[key], theirs[key]) for key in mine}
    f1_changes = {
        name: Delta(model=a.per_intent[name].f1, other=b.per_intent[name].f1, delta=a.per_intent[name].f1 - b.per_intent[name].f1)
        for name in a.per_intent
    }
    return Comparison(
        other_model=other_path, other_version=b.model_version, other=b.model, metrics=metrics,
        mcnemar=mcnemar(_correct(model.records), _correct(other.records)),
        per_intent_f1=dict(sorted(f1_changes.items(), key=lambda item: (item[1].delta or 0.0, item[0]))),
    )


def _delta(model: float | None, other: float | None) -> Delta:
    return Delta(model=model, other=other, delta=None if model is None or other is None else model - other)


def _correct(records: list[Record]) -> np.ndarray:
    return np.array([r["correct"] for r in records], dtype=bool)


# ---- one bundle, and cross-validation ------------------------------------------------------------


def evaluate_bundle(
    model: str | Path, dataset: Dataset, *, open_set: bool, worst: int, latency_sample: int, progress: bool
) -> Evaluation:
    """Score one bundle on `dataset`: records, metrics, latency."""
    classifier = IntentClassifier.from_bundle(model)
    data.check_labels(dataset, classifier.labels, model=str(model))
    records, seconds = predict_records(classifier, dataset, open_set=open_set, progress=progress)
    latency = measure_latency(classifier, list(dataset["text"]), batch_seconds=seconds, sample_size=latency_sample, progress=progress)
    report = EvaluationReport(
        model_version=classifier.version, model=model_info(classifier.bundle), latency_ms=latency,
        **build_report(records, worst=worst).model_dump(),
    )
    return Evaluation(records, report)


def model_info(bundle: Bundle) -> ModelInfo:
    manifest = bundle.manifest
    return ModelInfo(
        path=str(bundle.path), strategy=manifest.strategy, base=manifest.base.id, precision=manifest.encoder.precision,
        intents=len(manifest.labels), temperature=manifest.calibration.temperature,
        confidence_floor=manifest.calibration.confidence_floor, ambiguity_gap=manifest.calibration.ambiguity_gap,
        handoff_intent=load_domain(bundle).handoff_intent,
    )


def fold_indices(labels: list[str], k: int, seed: int, *, where: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """K stratified folds of the data at `where`: every label needs an example in each of the K test parts
    (StratifiedKFold refuses fewer than K with a ValueError) and two in each training part, which keeps
    count - ceil(count / K). The label with the fewest examples decides, so it is the one the error names."""
    from sklearn.model_selection import StratifiedKFold

    needed = next(n for n in range(k, 10 * k) if n - -(-n // k) >= 2)
    label, count = min(Counter(labels).items(), key=lambda item: (item[1], item[0]))
    if count < needed:
        raise data.DataError(f"{where}: label {label!r} has {count} example(s), the fewest of any label; "
                             f"{k}-fold cross-validation needs at least {needed} per label")
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(folds.split(np.zeros(len(labels)), labels))


def cross_validate(
    model: str | Path, dataset: Dataset, spec: str, k: int, *, worst: int, latency_sample: int, progress: bool
) -> Evaluation:
    """Retrain the bundle's recipe on K stratified folds; pool the out-of-fold records; mean and sd per metric."""
    from .train import prepare_splits, train

    bundle = bundle_mod.load(model)
    recipe = recipe_of(bundle)
    folds = fold_indices(list(dataset["label"]), k, recipe.seed, where=spec)
    open_set = data.OOS_LABEL in set(dataset["label"])
    records: list[Record] = []
    per_fold: list[dict[str, Any]] = []
    seconds = 0.0
    with tempfile.TemporaryDirectory(prefix="supportbot-cv-") as tmp:
        for fold, (train_idx, test_idx) in enumerate(tqdm(folds, desc="cross-validation", unit="fold", disable=None if progress else True), 1):
            # no ONNX export per fold: it passed parity on the bundle, and a fold's figures come out the same on torch
            cfg = recipe.model_copy(update={"data": spec, "eval_data": None, "output": str(Path(tmp) / f"fold-{fold}"),
                                            "onnx": False})
            prepared = prepare_splits(cfg, dataset.select(train_idx), None)
            trained = train(cfg, prepared=prepared, progress=False, log=lambda _msg: None)
            classifier = IntentClassifier.from_bundle(trained.bundle.path)
            fold_records, fold_seconds = predict_records(
                classifier, dataset.select(test_idx), open_set=open_set, progress=progress, fold=fold
            )
            records += fold_records
            seconds += fold_seconds
            per_fold.append({
                "fold": fold, "n_train": len(train_idx), "confidence_floor": classifier.confidence_floor,
                **fold_metrics(build_report(fold_records, worst=0)),
            })
        latency = measure_latency(
            classifier, list(dataset["text"]), batch_seconds=seconds, sample_size=latency_sample, progress=progress
        )
    report = EvaluationReport(
        model_version=bundle.version, model=model_info(bundle),
        latency_ms=latency.model_copy(update={"note": latency.note + f"; single-text timings on the fold {k} model"}),
        cross_validation=cv_summary(per_fold, k, recipe), **build_report(records, worst=worst).model_dump(),
    )
    return Evaluation(records, report)


def fold_metrics(scores: Scores) -> dict[str, Any]:
    """The scalar metrics of one fold."""
    return {"n": scores.n, **scores.scalar_metrics()}


def cv_summary(per_fold: list[dict[str, Any]], k: int, recipe: TrainConfig) -> CrossValidation:
    skip = {"fold", "n", "n_train"}
    keys = [key for key in per_fold[0] if key not in skip and all(fold.get(key) is not None for fold in per_fold)]
    values = {key: np.array([fold[key] for fold in per_fold], dtype=float) for key in keys}
    return CrossValidation(
        k=k, seed=recipe.seed, strategy=recipe.strategy, stratified=True,
        note="the recipe stored in --model retrained on each fold's other K-1 parts (validation split off them "
        "as in training); sd is the sample standard deviation (ddof=1) over folds; the other top-level metrics "
        "pool all out-of-fold predictions",
        folds=per_fold,
        mean={key: float(v.mean()) for key, v in values.items()},
        sd={key: float(v.std(ddof=1)) for key, v in values.items()},
    )


# ---- one run, as `supportbot evaluate` asks for it ---------------------------------------------------


def run(
    model: str | Path, spec: str, *, compare: str | Path | None = None, cv: int | None = None, worst: int = 20,
    latency_sample: int = 200, progress: bool = True, require_out_of_scope: bool = False, questions: str | Path | None = None,
) -> Evaluation:
    """Evaluate (or cross-validate, or compare) one bundle on the data at `spec`; nothing is written yet.

    `require_out_of_scope`: refuse data without `oos` examples (an out-of-scope gate needs them).
    The command line's options, gate and output live in supportbot/cli.py and finetune/report.py.
    """
    options: dict[str, Any] = {"worst": worst, "latency_sample": latency_sample, "progress": progress}
    splits = data.load(spec)
    split, dataset = training_split(splits) if cv else data.evaluation_split(splits)
    open_set = data.OOS_LABEL in set(dataset["label"])
    if require_out_of_scope and not open_set:
        raise data.DataError(f"{spec}: --min-oos-recall needs out-of-scope ({data.OOS_LABEL!r}) examples in the data")
    if cv:
        evaluation = cross_validate(model, dataset, spec, cv, **options)
    else:
        evaluation = evaluate_bundle(model, dataset, open_set=open_set, **options)
    if compare:
        other = evaluate_bundle(compare, dataset, open_set=open_set, **options)
        evaluation.report.compare = compare_reports(evaluation, other, str(compare))
        evaluation.extra_files["compare_predictions.jsonl"] = other.records
    if len(splits) == 1 and Path(spec).is_file():
        split = "whole file"
    evaluation.report.data = DataInfo(spec=str(spec), split=split, n=len(dataset), out_of_scope=open_set)
    evaluation.report.knowledge = knowledge_section(model, spec, questions, worst)
    evaluation.report.created = datetime.now(UTC).isoformat(timespec="seconds")
    return evaluation


def knowledge_section(model: str | Path, spec: str, questions: str | Path | None, worst: int) -> KnowledgeScores | None:
    """Knowledge metrics (docs/knowledge.md) on `questions`, else the data's pack's knowledge/questions/test.yaml."""
    from .knowledge_train import QUESTIONS_DIR, evaluate_knowledge, knowledge_folder

    named = Path(questions) if questions is not None else None
    if named is None:
        folder = knowledge_folder(str(spec), None)
        default = folder / QUESTIONS_DIR / "test.yaml" if folder is not None else None
        if default is None or not default.is_file():
            return None
        named = default
    section = evaluate_knowledge(model, named, worst=worst)
    if section is None:
        if questions is not None:
            raise data.DataError(f"--questions {named}: the bundle {model} has no help-centre articles (train it with --knowledge DIR)")
        return None
    return KnowledgeScores.model_validate(section)
