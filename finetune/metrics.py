"""Metric names and the metric arithmetic shared by training, evaluation and the pictures, each written once.

- The names: which numbers headline a report (`SUMMARY_KEYS`), how people read them (`LABELS`),
  the ECE bin count and the top-k width. finetune/report_model.py, finetune/report.py and
  supportbot/cli.py read them from here, so evaluate and report do not import each other.
- `bin_stats`: equal-width confidence bins (mean confidence, accuracy, count per bin); the ECE
  and the reliability diagram are both computed from it, so the picture shows the bins the
  number was computed on.
- `training_metrics`: the scores training reports on validation data and on `--eval-data`
  (finetune/train.py) at the bundle's confidence floor.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

ECE_BINS = 15
TOP_K = 3
SUMMARY_KEYS = ("accuracy", "macro_f1", "weighted_f1", "top3_accuracy")

# How a metric key reads in the HTML report and the terminal table.
LABELS = {
    "accuracy": "accuracy", "macro_f1": "macro-F1", "weighted_f1": "weighted-F1", "top3_accuracy": "top-3 accuracy",
    "in_scope_accuracy": "in-scope accuracy", "oos_recall": "OOS recall", "oos_precision": "OOS precision",
    "answer_share": "answer share", "clarify_share": "clarify share", "fallback_share": "fallback share",
    "handoff_share": "handoff share", "answer_accuracy": "accuracy of answered messages", "ece_raw": "ECE raw",
    "ece_calibrated": "ECE temperature-scaled", "latency_single_p50_ms": "latency single p50 (ms)",
    "latency_single_p95_ms": "latency single p95 (ms)", "latency_batch_per_text_ms": "latency batched per text (ms)",
    "confidence_floor": "confidence floor (each fold's own)",
}


def bin_stats(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin over [0, 1]: mean confidence, accuracy, count (a bin's upper edge belongs to it)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(float)
    mean_conf = np.bincount(which, weights=confidence, minlength=bins) / np.maximum(count, 1)
    accuracy = np.bincount(which, weights=correct.astype(float), minlength=bins) / np.maximum(count, 1)
    return mean_conf, accuracy, count


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE with equal-width bins over the top-class confidence: sum over bins of share x |confidence - accuracy|."""
    if len(confidence) == 0:
        return 0.0
    mean_conf, accuracy, count = bin_stats(np.asarray(confidence, dtype=float), np.asarray(correct), bins)
    return float(np.sum(count / count.sum() * np.abs(mean_conf - accuracy)))


def training_metrics(probs: np.ndarray, targets: np.ndarray, oos_probs: np.ndarray | None, floor: float) -> dict[str, float]:
    """Accuracy and macro-F1 of the top intent; with out-of-scope examples, in-scope accuracy at the floor and OOS recall."""
    pred = probs.argmax(1)
    out = {
        "accuracy": float(accuracy_score(targets, pred)) if len(targets) else 0.0,
        "macro_f1": float(f1_score(targets, pred, average="macro")) if len(targets) else 0.0,
    }
    if oos_probs is not None and len(oos_probs):
        out["in_scope_accuracy"] = float(((pred == targets) & (probs.max(1) >= floor)).mean())
        out["oos_recall"] = float((oos_probs.max(1) < floor).mean())
    return out
