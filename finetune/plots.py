"""The evaluation report's pictures, and discovery's (matplotlib, Agg backend): each function writes one PNG.

The report's read the per-example records of finetune/evaluate.py, so a picture and the numbers in
report.json always come from the same predictions; `discovery_png` reads what `supportbot discover`
writes to clusters.json.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TypeVar

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
from scipy.spatial.distance import pdist
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from .data import OOS_LABEL
from .metrics import bin_stats
from .report_model import CalibrationScores, EvaluationReport, Record

DPI = 110
LABEL_ALL_UP_TO = 80  # intents; above this only the worst ones get a tick label
WORST_LABELLED = 40


SaveTarget = TypeVar("SaveTarget", Path, io.BytesIO)


def _save(fig: Figure, path: SaveTarget) -> SaveTarget:
    fig.savefig(path, dpi=DPI, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


def _in_scope(records: list[Record]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Calibrated and raw top confidence and top-1 correctness of the in-scope messages."""
    rows = [r for r in records if r["gold"] != OOS_LABEL]
    return (
        np.array([r["confidence"] for r in rows], dtype=float),
        np.array([r["confidence_raw"] for r in rows], dtype=float),
        np.array([r["top3"][0][0] == r["gold"] for r in rows], dtype=bool),
    )


def _oos_confidence(records: list[Record]) -> np.ndarray:
    return np.array([r["confidence"] for r in records if r["gold"] == OOS_LABEL], dtype=float)


# ---- confusion matrix ------------------------------------------------------------------------------


def cluster_order(norm: np.ndarray) -> np.ndarray:
    """Order intents so that those confused with each other sit together.

    Each intent is described by its row of the symmetrised confusion matrix (diagonal set to 1);
    average-linkage clustering on cosine distance, with optimal leaf ordering, puts intents that
    share confusions next to each other, so confusions show as blocks near the diagonal.
    """
    n = len(norm)
    if n < 3:
        return np.arange(n)
    profile = (norm + norm.T) / 2
    np.fill_diagonal(profile, 1.0)
    distances = np.nan_to_num(pdist(profile, "cosine"), nan=1.0)
    tree = optimal_leaf_ordering(linkage(distances, "average"), distances)
    return leaves_list(tree)


def worst_intents(norm: np.ndarray, labels: list[str], limit: int) -> set[str]:
    """Intents with the largest share of their messages predicted as something else, or most predicted wrongly into."""
    off = norm.copy()
    np.fill_diagonal(off, 0.0)
    badness = off.sum(axis=1) + off.sum(axis=0)
    ranked = np.argsort(-badness, kind="stable")
    return {labels[i] for i in ranked[:limit] if badness[i] > 0}


def confusion_matrix_png(records: list[Record], path: Path) -> Path:
    """Row-normalised confusion matrix, clustered; every intent labelled up to 80, else only the worst 40."""
    gold = [r["gold"] for r in records]
    predicted = [r["predicted"] for r in records]
    labels = sorted(set(gold) | set(predicted))
    counts = sk_confusion_matrix(gold, predicted, labels=labels).astype(float)
    norm = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    order = cluster_order(norm)
    matrix, names = norm[np.ix_(order, order)], [labels[i] for i in order]
    n = len(names)
    side = float(np.clip(0.13 * n + 3.5, 6.0, 15.0))
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    cmap = matplotlib.colormaps["magma_r"].with_extremes(bad="white")  # empty cells stay white: confusions stand out
    image = ax.imshow(
        np.ma.masked_equal(matrix, 0.0), cmap=cmap, norm=PowerNorm(gamma=0.4, vmin=0.0, vmax=1.0), interpolation="nearest"
    )
    ax.set_facecolor("white")
    shown = set(names) if n <= LABEL_ALL_UP_TO else worst_intents(norm, labels, WORST_LABELLED) | {OOS_LABEL}
    ticks = [i for i, name in enumerate(names) if name in shown]
    fontsize = float(np.clip(520 / max(n, 1), 4.5, 9.0)) if n <= LABEL_ALL_UP_TO else 6.0
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=fontsize)
    ax.set_xlabel("predicted intent")
    ax.set_ylabel("true intent")
    subtitle = "" if n <= LABEL_ALL_UP_TO else f"; {len(ticks)} most-confused of {n} intents labelled"
    ax.set_title(f"Confusion matrix: share of each true intent's messages (n={len(records)}), clustered{subtitle}", fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label("share of the true intent's messages (colour scale stretched for small shares)")
    return _save(fig, path)


# ---- calibration ---------------------------------------------------------------------------------------


def reliability_png(records: list[Record], calibration: CalibrationScores, path: Path) -> Path:
    """Accuracy against confidence per bin, raw and temperature-scaled, with the bins' message counts below."""
    confidence, raw, correct = _in_scope(records)
    bins = calibration.bins
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7.5), height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for values, name, ece, colour in (
        (raw, "raw softmax", calibration.ece_raw, "tab:orange"),
        (confidence, "temperature-scaled", calibration.ece_calibrated, "tab:blue"),
    ):
        mean_conf, accuracy, count = bin_stats(values, correct, bins)  # the bins the ECE was computed on
        used = count > 0
        top.plot(mean_conf[used], accuracy[used], marker="o", color=colour, label=f"{name} (ECE {ece:.3f})")
    top.set_ylabel("accuracy in bin")
    top.set_ylim(0, 1.02)
    top.set_title(f"Reliability diagram, {bins} equal-width bins, {len(confidence)} in-scope messages", fontsize=10)
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    edges = np.linspace(0, 1, bins + 1)
    bottom.hist([raw, confidence], bins=list(edges), color=["tab:orange", "tab:blue"], label=["raw", "scaled"])
    bottom.set_yscale("log")
    bottom.set_xlabel("top-intent confidence")
    bottom.set_ylabel("messages")
    bottom.set_xlim(0, 1)
    return _save(fig, path)


def confidence_histogram_png(records: list[Record], floor: float, path: Path) -> Path:
    """Calibrated top confidence of right vs wrong in-scope predictions (and out-of-scope messages)."""
    confidence, _, correct = _in_scope(records)
    oos = _oos_confidence(records)
    edges = np.linspace(0, 1, 26)
    groups = [(confidence[correct], "tab:green", f"right top intent ({correct.sum()})"),
              (confidence[~correct], "tab:red", f"wrong top intent ({(~correct).sum()})")]
    if len(oos):
        groups.append((oos, "tab:purple", f"out of scope ({len(oos)})"))
    fig, ax = plt.subplots(figsize=(8, 4.8))
    ax.hist([g[0] for g in groups], bins=list(edges), color=[g[1] for g in groups], label=[g[2] for g in groups])
    ax.axvline(floor, color="black", ls="--", lw=1.2, label=f"confidence floor {floor:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("calibrated top-intent confidence")
    ax.set_ylabel("messages (log scale)")
    ax.set_title("Confidence of right and wrong predictions", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def threshold_sweep_png(records: list[Record], floor: float, path: Path) -> Path:
    """Coverage and accuracy of answered in-scope messages (and OOS recall) as the confidence floor moves."""
    confidence, _, correct = _in_scope(records)
    oos = _oos_confidence(records)
    grid = np.union1d(np.linspace(0, 1, 201), [floor])  # the floor itself is a grid point
    kept = confidence[None, :] >= grid[:, None]
    coverage = kept.mean(axis=1) if len(confidence) else np.zeros_like(grid)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = (kept & correct[None, :]).sum(axis=1) / kept.sum(axis=1)
    fig, ax = plt.subplots(figsize=(8, 5))
    curves = [(coverage, "tab:blue", "coverage: share of in-scope messages at or above the floor"),
              (accuracy, "tab:green", "accuracy of the messages at or above the floor")]
    if len(oos):
        curves.append(((oos[None, :] < grid[:, None]).mean(axis=1), "tab:purple", "out-of-scope recall: share of oos below the floor"))
    at = int(np.searchsorted(grid, floor))
    for values, colour, label in curves:
        ax.plot(grid, values, color=colour, label=f"{label} ({values[at]:.3f} at the floor)")
        if np.isfinite(values[at]):
            ax.plot(grid[at], values[at], "o", color=colour)
    ax.axvline(floor, color="black", ls="--", lw=1.2)
    ax.text(floor, 0.5, f"bundle's confidence floor {floor:.2f} ", fontsize=8, rotation=90, ha="right", va="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.03)
    ax.set_xlabel("confidence floor (calibrated top-intent confidence)")
    ax.set_title("Threshold sweep: what moving the confidence floor would do", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def operating_curve_png(records: list[Record], floor: float, auroc: float | None, path: Path) -> Path:
    """In-scope answered-and-right against out-of-scope recall as the floor sweeps 0..1; the bundle's floor marked."""
    confidence, _, correct = _in_scope(records)
    oos = _oos_confidence(records)
    grid = np.union1d(np.linspace(0, 1, 201), [floor])
    answered_right = ((confidence[None, :] >= grid[:, None]) & correct[None, :]).mean(axis=1)
    recall = (oos[None, :] < grid[:, None]).mean(axis=1)
    at = int(np.searchsorted(grid, floor))
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot(recall, answered_right, color="tab:blue", label="floors 0 to 1")
    for f in (0.2, 0.4, 0.6, 0.8):
        i = int(np.searchsorted(grid, f))
        ax.annotate(f"{f:.1f}", (recall[i], answered_right[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.plot(recall[i], answered_right[i], ".", color="tab:blue")
    ax.plot(recall[at], answered_right[at], "o", color="black",
            label=f"bundle's floor {floor:.2f}: {answered_right[at]:.3f} right, {recall[at]:.3f} oos recall")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("out-of-scope recall (share of oos messages below the floor)")
    ax.set_ylabel("in-scope answered and right")
    title = "Operating curve across confidence floors"
    ax.set_title(title + (f" (AUROC {auroc:.3f})" if auroc is not None else ""), fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def discovery_png(silhouettes: dict[int, float], chosen: int, sizes: list[int], noise: int) -> bytes:
    """How discovery chose k (the silhouette of each cut tried, the chosen one marked) beside the clusters' sizes,
    largest first (what a reviewer reads first), with the noise count in the title. The PNG's bytes: discovery
    writes them atomically with its other outputs."""
    ks = sorted(silhouettes)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(ks, [silhouettes[k] for k in ks], ".-", color="tab:blue", label="cosine silhouette of the cut")
    left.axvline(chosen, color="black", linestyle="--", linewidth=1,
                 label=f"chosen k = {chosen} (first persistent peak)")
    left.set_xlabel("k (clusters in the cut)")
    left.set_ylabel("silhouette")
    left.set_title("How the number of intents was chosen", fontsize=10)
    left.legend(loc="lower right", fontsize=8)
    left.grid(alpha=0.3)
    ordered = sorted(sizes, reverse=True)
    right.bar(np.arange(1, len(ordered) + 1), ordered, color="tab:green", width=0.9)
    right.set_xlabel("candidate intent (largest first)")
    right.set_ylabel("messages")
    right.set_title(f"{len(ordered)} candidate intents; {noise} messages as noise", fontsize=10)
    right.grid(alpha=0.3, axis="y")
    return _save(fig, io.BytesIO()).getvalue()


def write_all(records: list[Record], report: EvaluationReport, out_dir: Path) -> dict[str, Path]:
    """Every picture of the report, by file name (the operating curve only when the data has `oos` examples)."""
    floor = report.floor_marked  # under cross-validation each fold has its own floor: their mean
    pictures = {
        "confusion_matrix.png": confusion_matrix_png(records, out_dir / "confusion_matrix.png"),
        "reliability_diagram.png": reliability_png(records, report.calibration, out_dir / "reliability_diagram.png"),
        "confidence_histogram.png": confidence_histogram_png(records, floor, out_dir / "confidence_histogram.png"),
        "threshold_sweep.png": threshold_sweep_png(records, floor, out_dir / "threshold_sweep.png"),
    }
    if report.out_of_scope is not None:
        auroc = report.out_of_scope.auroc
        pictures["operating_curve.png"] = operating_curve_png(records, floor, auroc, out_dir / "operating_curve.png")
    return pictures

