"""Choosing the operating threshold that reaches a target sensitivity."""

from __future__ import annotations

import numpy as np

from melanoma_ml.errors import InputValueError

SENSITIVITY_TOLERANCE = 1e-9
"""Slack when comparing a sensitivity with its target, so 27/30 counts as reaching 0.9 despite float error."""


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """The largest threshold whose sensitivity is at least ``target`` under the rule ``p >= threshold``.

    The answer is always one of the melanoma cases' probabilities: raising the threshold past it would
    drop that case (and its ties) and fall below the target.

    Raises:
        ValueError: no melanoma case in ``y``, or ``target`` outside (0, 1].
    """
    if not 0 < target <= 1:
        raise InputValueError(f"target sensitivity must lie in (0, 1], got {target}")
    positives = np.sort(np.asarray(p, dtype=np.float64)[np.asarray(y) == 1])[::-1]
    if positives.size == 0:
        raise InputValueError(
            "cannot tune a threshold for sensitivity without melanoma cases in the evaluation set; "
            "evaluate on more folds or a larger sample"
        )
    reached = np.arange(1, positives.size + 1) / positives.size >= target - SENSITIVITY_TOLERANCE
    return float(positives[int(np.argmax(reached))])
