"""The evaluation report as a schema: report.json's sections as pydantic models.

finetune/evaluate.py builds an `EvaluationReport`; finetune/report.py, finetune/plots.py and the
CLI (supportbot/cli.py) read its typed fields. report.json is `EvaluationReport.to_json()`: the
same keys as before the schema (model_version, n, accuracy, macro_f1, weighted_f1, top3_accuracy,
per_intent, out_of_scope, actions, answer_accuracy, calibration, confused_pairs, worst_errors,
latency_ms, then cross_validation / compare when asked for, data, created, gate, files), so CI
scripts that read it keep working. `out_of_scope` and `answer_accuracy` are written as null when
they do not apply; the optional sections are left out when they were not asked for.

This module and finetune/metrics.py are what evaluate and report share, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from .metrics import SUMMARY_KEYS

Record = dict[str, Any]  # one line of predictions.jsonl


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelInfo(_Model):
    path: str
    strategy: str
    base: str
    precision: str = "fp32"
    intents: int
    temperature: float
    confidence_floor: float
    ambiguity_gap: float
    handoff_intent: str | None = None


class IntentScores(_Model):
    precision: float
    recall: float
    f1: float
    support: int


class OperatingPoint(_Model):
    """One confidence floor on the out-of-scope operating curve."""

    floor: float
    in_scope_answered_right: float
    oos_recall: float


class OutOfScope(_Model):
    in_scope_accuracy: float
    recall: float
    precision: float
    n_out_of_scope: int
    n_in_scope: int
    rule: str
    auroc: float | None = None  # in-scope vs oos by calibrated top confidence; null in reports written before it
    curve: list[OperatingPoint] = []


class CalibrationScores(_Model):
    ece_raw: float
    ece_calibrated: float
    bins: int
    n: int


class ConfusedPair(_Model):
    a: str
    b: str
    count: int
    a_predicted_as_b: int
    b_predicted_as_a: int


class WorstError(_Model):
    text: str
    gold: str
    predicted: str
    confidence: float
    action: str
    fold: int | None = None


class KnowledgeMiss(_Model):
    text: str
    article: str | None  # the right article's slug (None: no article answers the question)
    cited: str  # the top passage's article
    passage_id: str
    score: float
    margin: float = 1.0  # the cited article's lead over the next one
    answered: bool  # the score cleared the bundle's retrieval floor and the lead its margin
    rank_of_right_article: int | None = None


class KnowledgeScores(_Model):
    """Knowledge answers on help-centre questions (finetune/knowledge_train.py `evaluate_knowledge`)."""

    questions: str
    n: int
    passages: int
    retrieval: str
    n_answerable: int
    n_unanswerable: int
    floor: float
    margin: float = 0.0  # the least lead over the runner-up article to answer (0: no such rule)
    recall_at_1: float
    recall_at_3: float
    mrr: float
    answered_right: float
    answered_wrong: float
    abstained: float
    unanswerable_abstained: float
    dialogue_actions: dict[str, float]
    dialogue_cited_right: float | None = None  # None: a report written before the field existed
    dialogue_cited_wrong: float | None = None
    worst_misses: list[KnowledgeMiss]
    note: str


class Latency(_Model):
    single_p50: float
    single_p95: float
    batch_per_text: float
    single_sample: int
    batched_texts: int
    batch_size: int
    threads: int
    note: str


class CrossValidation(_Model):
    k: int
    seed: int
    strategy: str
    stratified: bool
    note: str
    folds: list[dict[str, Any]]  # per fold: fold, n_train, confidence_floor and the scalar metrics
    mean: dict[str, float]
    sd: dict[str, float]


class Delta(_Model):
    model: float | None
    other: float | None
    delta: float | None


class McNemar(_Model):
    model_only_right: int
    other_only_right: int
    statistic: float
    p_value: float
    method: str
    verdict: str


class Comparison(_Model):
    other_model: str
    other_version: str
    other: ModelInfo
    metrics: dict[str, Delta]
    mcnemar: McNemar
    per_intent_f1: dict[str, Delta]


class DataInfo(_Model):
    spec: str
    split: str
    n: int
    out_of_scope: bool


class Gate(_Model):
    min_accuracy: float | None
    min_oos_recall: float | None
    passed: bool
    reason: str | None


class Scores(_Model):
    """The metric part of a report: a pure function of the per-example records (`build_report`)."""

    n: int
    accuracy: float
    macro_f1: float
    weighted_f1: float
    top3_accuracy: float
    per_intent: dict[str, IntentScores]
    out_of_scope: OutOfScope | None
    actions: dict[str, float]
    answer_accuracy: float | None
    calibration: CalibrationScores
    confused_pairs: list[ConfusedPair]
    worst_errors: list[WorstError]

    def scalar_metrics(self) -> dict[str, float | None]:
        """The headline numbers as one flat mapping: what folds average and comparisons subtract."""
        out: dict[str, float | None] = {key: getattr(self, key) for key in SUMMARY_KEYS}
        if self.out_of_scope is not None:
            oos = self.out_of_scope
            out |= {"in_scope_accuracy": oos.in_scope_accuracy, "oos_recall": oos.recall, "oos_precision": oos.precision}
        out |= {f"{action}_share": share for action, share in self.actions.items()}
        out |= {"answer_accuracy": self.answer_accuracy, "ece_raw": self.calibration.ece_raw,
                "ece_calibrated": self.calibration.ece_calibrated}
        return out


# Sections written only when they apply (absent from report.json otherwise, as before the schema).
OPTIONAL_SECTIONS = ("latency_ms", "cross_validation", "compare", "data", "created", "gate", "knowledge")


class EvaluationReport(Scores):
    """report.json: which model, its scores, and what the run was asked to do."""

    model_version: str
    model: ModelInfo
    latency_ms: Latency | None = None
    cross_validation: CrossValidation | None = None
    compare: Comparison | None = None
    data: DataInfo | None = None
    created: str | None = None
    gate: Gate | None = None
    knowledge: KnowledgeScores | None = None
    files: list[str] = []

    def scalar_metrics(self) -> dict[str, float | None]:
        out = super().scalar_metrics()
        if self.latency_ms is not None:
            latency = self.latency_ms
            out |= {"latency_single_p50_ms": latency.single_p50, "latency_single_p95_ms": latency.single_p95,
                    "latency_batch_per_text_ms": latency.batch_per_text}
        return out

    @property
    def floor_marked(self) -> float:
        """The confidence floor the pictures mark: the bundle's, or the folds' mean under cross-validation."""
        if self.cross_validation is not None:
            return self.cross_validation.mean["confidence_floor"]
        return self.model.confidence_floor

    def to_json(self) -> dict[str, Any]:
        """report.json's content: model_version and model first, the scores, then the sections that apply."""
        data = self.model_dump(mode="json")
        head = {"model_version": data.pop("model_version"), "model": data.pop("model")}
        tail = {key: data.pop(key) for key in (*OPTIONAL_SECTIONS, "files")}
        for key in OPTIONAL_SECTIONS:
            if tail[key] is None:
                del tail[key]
        if not tail["files"]:
            del tail["files"]
        for error in data["worst_errors"]:  # `fold` only under cross-validation
            if error["fold"] is None:
                del error["fold"]
        return {**head, **data, **tail}


@dataclass
class Evaluation:
    """One bundle scored on one dataset: the per-example records and the report built from them."""

    records: list[Record]
    report: EvaluationReport
    extra_files: dict[str, list[Record]] = field(default_factory=dict)


def gate(report: EvaluationReport, min_accuracy: float | None, min_oos_recall: float | None) -> Gate:
    """Whether a CI pipeline should let this model through, and if not, why."""
    reasons = []
    if min_accuracy is not None and report.accuracy < min_accuracy:
        reasons.append(f"accuracy {report.accuracy:.4f} is below --min-accuracy {min_accuracy:g}")
    oos = report.out_of_scope
    if min_oos_recall is not None and oos is not None and oos.recall < min_oos_recall:
        reasons.append(f"out-of-scope recall {oos.recall:.4f} is below --min-oos-recall {min_oos_recall:g}")
    reason = "; ".join(reasons) or None
    return Gate(min_accuracy=min_accuracy, min_oos_recall=min_oos_recall, passed=reason is None, reason=reason)
