"""Calibration fitted on held-out data (validation, and out-of-scope examples nothing trains on): a temperature, a confidence floor, an ambiguity gap.

These are data of a model version (like Rasa's fallback thresholds), stored in the bundle,
never constants in code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bot.policy import decision_masks

from .config import CALIBRATION_GRID, CalibrationConfig

GRID = np.array(CALIBRATION_GRID)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, *, max_iter: int = 200) -> float:
    """The T > 0 that minimises validation NLL of softmax(logits / T) (Guo et al. 2017)."""
    if len(targets) == 0:
        return 1.0
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")
    logits, targets = logits.detach().float(), targets.long()

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(np.clip(log_t.exp().item(), 0.05, 20.0))


@dataclass
class Thresholds:
    confidence_floor: float
    ambiguity_gap: float
    method: str
    objective: float

    def as_dict(self) -> dict:
        return asdict(self)


def choose_thresholds(
    probs: np.ndarray, targets: np.ndarray, oos_probs: np.ndarray | None, cfg: CalibrationConfig
) -> Thresholds:
    """Pick the confidence floor and ambiguity gap jointly on calibrated validation probabilities.

    Each (floor, gap) on a grid is scored by running the bot's own rule (`bot.policy.decision_masks`)
    over validation messages. In scope: a right answer is worth 1, a wrong one
    -`wrong_answer_cost`, a clarify question whose two options hold the answer
    `clarify_value` (-`clarify_value` when they miss), a fallback 0. Out of scope (when the
    data has examples): a fallback is worth 1, a clarify -`clarify_value`, an answer 0 - so
    with cost 1 the score is in-scope accuracy + out-of-scope recall, less the harm of wrong
    answers and useless questions. Among equally good cells the middle of the plateau wins (the
    median best floor, then the median best gap at that floor), so each threshold sits as far as the
    validation data allow from the examples that decide it, instead of on the edge of one of them.
    """
    if cfg.target_oos_recall is not None and oos_probs is not None and len(oos_probs):
        return _floor_for_oos_recall(probs, targets, oos_probs, cfg, cfg.target_oos_recall)
    in_score = _utility_grid(probs, targets, cfg)
    score = in_score.mean(axis=0)
    method = f"max right - {cfg.wrong_answer_cost:g} x wrong (+/-{cfg.clarify_value:g} per clarify) on validation"
    if oos_probs is not None and len(oos_probs):
        score = score + _utility_grid(oos_probs, None, cfg).mean(axis=0)
        method = "max in-scope utility + out-of-scope recall on held-out examples (validation, and the out-of-scope examples nothing trains on)"
    best = score.max()
    floors, gaps = _grid(cfg)
    best_cells = score >= best - 1e-9
    fi = _median_index(np.flatnonzero(best_cells.any(axis=1)))
    gi = _median_index(np.flatnonzero(best_cells[fi]))
    return Thresholds(float(floors[fi]), float(gaps[gi]), method, float(best))


def oos_recall(oos_probs: np.ndarray, floor: float) -> float:
    """Share of out-of-scope messages whose top confidence is below the floor (the evaluation's rule)."""
    return float((oos_probs.max(axis=1) < floor).mean()) if len(oos_probs) else 0.0


def _floor_for_oos_recall(
    probs: np.ndarray, targets: np.ndarray, oos_probs: np.ndarray, cfg: CalibrationConfig, target: float
) -> Thresholds:
    """The lowest grid floor whose validation out-of-scope recall reaches `target`; the gap as usual at that floor.

    A team that must rarely answer an out-of-scope message asks for the recall it needs; every
    higher floor would also reach it, but sends more in-scope messages to fallback, so the lowest
    one wins. When no floor up to `max_floor` reaches the target, `max_floor` is used and the method
    says so (the bundle records what was asked and what was had).
    """
    floors, gaps = _grid(cfg)
    recalls = np.array([oos_recall(oos_probs, float(f)) for f in floors])
    reached = np.flatnonzero(recalls >= target - 1e-12)
    fi = int(reached[0]) if len(reached) else len(floors) - 1
    score = _utility_grid(probs, targets, cfg).mean(axis=0)[fi] + _utility_grid(oos_probs, None, cfg).mean(axis=0)[fi]
    best = score.max()
    gi = _median_index(np.flatnonzero(score >= best - 1e-9))
    verdict = "reached" if len(reached) else f"not reached (max_floor {floors[fi]:g} gives {recalls[fi]:.4f})"
    method = f"lowest floor with out-of-scope recall >= {target:g} on the held-out out-of-scope examples: {verdict}"
    return Thresholds(float(floors[fi]), float(gaps[gi]), method, float(best))


def _median_index(indices: np.ndarray) -> int:
    return int(indices[(len(indices) - 1) // 2])


def _grid(cfg: CalibrationConfig) -> tuple[np.ndarray, np.ndarray]:
    floors = GRID[(cfg.min_floor <= GRID) & (cfg.max_floor >= GRID)]
    gaps = GRID[cfg.max_gap >= GRID]
    return floors, gaps


def _utility_grid(probs: np.ndarray, targets: np.ndarray | None, cfg: CalibrationConfig) -> np.ndarray:
    """Per-message utility for every (floor, gap): shape (n, n_floors, n_gaps)."""
    floors, gaps = _grid(cfg)
    order = np.argsort(probs, axis=1)
    top1 = probs[np.arange(len(probs)), order[:, -1]]
    top2 = probs[np.arange(len(probs)), order[:, -2]] if probs.shape[1] > 1 else np.zeros(len(probs))
    clarify, answer = decision_masks(top1[:, None, None], top2[:, None, None], floors[None, :, None], gaps[None, None, :])
    if targets is None:  # out of scope: only a fallback is right
        return np.where(clarify, -cfg.clarify_value, np.where(answer, 0.0, 1.0)).astype(np.float32)
    right = (order[:, -1] == targets)[:, None, None]
    hit = (order[:, -2:] == targets[:, None]).any(axis=1)[:, None, None]
    answer_value = np.where(right, 1.0, -cfg.wrong_answer_cost)
    clarify_value = np.where(hit, cfg.clarify_value, -cfg.clarify_value)
    return np.where(answer, answer_value, np.where(clarify, clarify_value, 0.0)).astype(np.float32)
