"""The dialogue policy: what to do with a classified message.

`decide()` is the single rule that turns a prediction into answer / clarify / fallback; the
same function (vectorised with numpy) picks thresholds during calibration, measures the
action mix during evaluation, and runs in the chatbot, so the three always agree.
Thresholds are data of a model version (bundle.json), never constants here.
"""

from __future__ import annotations

import numpy as np

ANSWER, CLARIFY, FALLBACK, HANDOFF = "answer", "clarify", "fallback", "handoff"
ACTIONS = (ANSWER, CLARIFY, FALLBACK, HANDOFF)


def decide(top1, top2, floor: float, gap: float):
    """answer when top-1 clears the floor and leads top-2 by at least the gap; clarify when the
    two are within the gap but together clear the floor ("did you mean A or B?"); else fallback.

    Works on floats or numpy arrays (then returns an array of action names).
    """
    clarify, answer = decision_masks(top1, top2, floor, gap)
    out = np.where(clarify, CLARIFY, np.where(answer, ANSWER, FALLBACK))
    return str(out) if out.ndim == 0 else out


def decision_masks(top1, top2, floor, gap) -> tuple[np.ndarray, np.ndarray]:
    """(clarify, answer) as boolean arrays (broadcast over the inputs); the rest is fallback."""
    top1, top2 = np.asarray(top1, dtype=float), np.asarray(top2, dtype=float)
    clarify = (top1 - top2 < gap) & (top1 + top2 >= floor)
    answer = ~clarify & (top1 >= floor)
    return clarify, answer
