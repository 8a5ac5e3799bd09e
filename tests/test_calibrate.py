"""Temperature scaling and threshold choice on synthetic logits with known answers."""

from __future__ import annotations

import numpy as np
import torch

from bot.policy import Action, decide
from finetune.calibrate import choose_thresholds, fit_temperature
from finetune.config import CalibrationConfig
from finetune.metrics import expected_calibration_error


def _sample(temperature: float, n: int = 4000, k: int = 5, seed: int = 0):
    """Labels drawn from softmax(z / T): the NLL-optimal temperature for logits z is T."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, size=(n, k))
    p = np.exp(z / temperature)
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])
    return torch.tensor(z, dtype=torch.float32), torch.tensor(y)


def test_fit_temperature_recovers_the_true_temperature():
    for true_t in (0.5, 2.0):
        logits, targets = _sample(true_t)
        assert abs(fit_temperature(logits, targets) - true_t) / true_t < 0.1


def test_temperature_scaling_lowers_ece_of_overconfident_logits():
    logits, targets = _sample(2.5)
    raw = torch.softmax(logits, -1).numpy()
    t = fit_temperature(logits, targets)
    cal = torch.softmax(logits / t, -1).numpy()
    ece_raw = expected_calibration_error(raw.max(1), raw.argmax(1) == targets.numpy())
    ece_cal = expected_calibration_error(cal.max(1), cal.argmax(1) == targets.numpy())
    assert ece_cal < ece_raw / 2


def test_ece_of_perfect_calibration_is_small_and_of_overconfidence_large():
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.1, 1.0, 20000)
    correct = rng.uniform(size=conf.size) < conf
    assert expected_calibration_error(conf, correct) < 0.02
    assert expected_calibration_error(np.ones(1000), np.zeros(1000, bool)) == 1.0


def test_decide_rule():
    assert decide(0.9, 0.05, floor=0.5, gap=0.1) == Action.ANSWER
    assert decide(0.45, 0.40, floor=0.5, gap=0.1) == Action.CLARIFY  # split between two, together confident
    assert decide(0.3, 0.1, floor=0.5, gap=0.1) == Action.FALLBACK
    assert decide(0.55, 0.5, floor=0.5, gap=0.0) == Action.ANSWER  # gap 0 never clarifies
    assert list(decide(np.array([0.9, 0.3]), np.array([0.05, 0.1]), 0.5, 0.1)) == [Action.ANSWER, Action.FALLBACK]


def test_floor_separates_out_of_scope_from_in_scope():
    """In scope: confident and right. Out of scope: diffuse. The floor must land between them."""
    rng = np.random.default_rng(2)
    k = 10
    targets = rng.integers(0, k, 500)
    in_probs = np.full((500, k), 0.02)
    in_probs[np.arange(500), targets] = rng.uniform(0.7, 0.95, 500)
    oos_probs = np.full((200, k), 0.05)
    oos_probs[:, 0] = rng.uniform(0.2, 0.45, 200)
    for probs in (in_probs, oos_probs):
        probs /= probs.sum(1, keepdims=True)
    chosen = choose_thresholds(in_probs, targets, oos_probs, CalibrationConfig())
    assert in_probs.max(1).min() >= chosen.confidence_floor > oos_probs.max(1).max()
    assert "out-of-scope" in chosen.method


def test_gap_turns_on_when_top_two_are_often_swapped():
    """Half the messages sit between two intents and the model picks the wrong one: asking beats guessing."""
    rng = np.random.default_rng(3)
    n, k = 400, 6
    targets = rng.integers(0, k, n)
    probs = np.full((n, k), 0.01)
    probs[np.arange(n), targets] = 0.9
    ambiguous = np.arange(n) < n // 2
    other = (targets + 1) % k
    probs[ambiguous, targets[ambiguous]] = 0.44
    probs[ambiguous, other[ambiguous]] = 0.5
    probs /= probs.sum(1, keepdims=True)
    chosen = choose_thresholds(probs, targets, None, CalibrationConfig())
    assert chosen.ambiguity_gap > 0.06
    clean = choose_thresholds(probs[~ambiguous], targets[~ambiguous], None, CalibrationConfig())
    clean_sorted = np.sort(probs[~ambiguous], axis=1)
    assert (clean_sorted[:, -1] - clean_sorted[:, -2] >= clean.ambiguity_gap).all()  # no clean message is questioned
    assert (clean_sorted[:, -1] >= clean.confidence_floor).all()


def test_thresholds_sit_in_the_middle_of_the_gap_between_classes():
    """In-scope confidences >= 0.8, out-of-scope <= 0.4: any floor in (0.4, 0.8] is perfect; take the middle."""
    rng = np.random.default_rng(4)
    k = 4
    targets = rng.integers(0, k, 300)
    in_probs = np.full((300, k), 0.2 / (k - 1))
    in_probs[np.arange(300), targets] = 0.8
    oos_probs = np.full((100, k), 0.6 / (k - 1))
    oos_probs[:, 0] = 0.4
    chosen = choose_thresholds(in_probs, targets, oos_probs, CalibrationConfig())
    assert 0.55 <= chosen.confidence_floor <= 0.65
