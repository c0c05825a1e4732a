"""Point estimates of every reported metric (no resampling here).

Threshold metrics use the decision rule ``prob >= threshold`` -> melanoma. The same count formulas
(:func:`rates_from_counts`) serve the bootstrap, which passes arrays of resampled counts.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score

from melanoma_ml.errors import InputValueError

THRESHOLD_METRICS: tuple[str, ...] = (
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "accuracy",
    "balanced_accuracy",
)
"""Metrics of a binary decision at one threshold, in report order."""


class ConfusionCounts(NamedTuple):
    tp: int
    fp: int
    tn: int
    fn: int


def require_both_classes(y: np.ndarray, what: str = "the evaluation set") -> None:
    """Raise the ValueError every ranking metric gives on a single-class label vector."""
    n_pos = int(np.sum(y == 1))
    n_neg = int(np.sum(y == 0))
    if n_pos == 0 or n_neg == 0:
        only = f"{n_neg} benign" if n_pos == 0 else f"{n_pos} melanoma"
        raise InputValueError(
            f"AUC needs both melanoma and benign cases in {what} (got only {only} images); "
            f"evaluate on more folds or a larger sample"
        )


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half)."""
    require_both_classes(y)
    return float(roc_auc_score(y, p))


def partial_auc(y: np.ndarray, p: np.ndarray, min_tpr: float) -> float:
    """Partial AUC above ``min_tpr`` true-positive rate, as scored in the ISIC 2024 challenge.

    The ROC region with TPR >= ``min_tpr`` is measured by flipping labels and scores, taking sklearn's
    McClish-standardised partial AUC up to ``max_fpr = 1 - min_tpr`` and undoing the standardisation,
    so the value ranges over [0, 0.5 * max_fpr**2 .. max_fpr]: 0.2 for a perfect classifier at 80% TPR.
    """
    require_both_classes(y)
    v_gt = np.abs(np.asarray(y) - 1)
    v_pred = -np.asarray(p, dtype=np.float64)
    max_fpr = 1.0 - min_tpr
    s = roc_auc_score(v_gt, v_pred, max_fpr=max_fpr)
    return float(0.5 * max_fpr**2 + (max_fpr - 0.5 * max_fpr**2) / (1.0 - 0.5) * (s - 0.5))


def confusion_counts(y: np.ndarray, p: np.ndarray, threshold: float) -> ConfusionCounts:
    """Counts of the decision ``p >= threshold`` against ``y``."""
    predicted = (np.asarray(p) >= threshold).astype(np.int8)
    tn, fp, fn, tp = confusion_matrix(y, predicted, labels=[0, 1]).ravel()
    return ConfusionCounts(tp=int(tp), fp=int(fp), tn=int(tn), fn=int(fn))


def rates_from_counts(tp, fp, tn, fn) -> dict[str, np.ndarray]:
    """Every threshold metric from confusion counts (scalars or equal-shape arrays).

    A ratio with a zero denominator is NaN (e.g. precision when nothing is called melanoma, sensitivity
    without melanoma cases), never a silent 0. F1 is ``2tp / (2tp + fp + fn)``, defined whenever there is
    a melanoma case or a positive call.
    """
    tp, fp, tn, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, tn, fn))

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)

    sensitivity = ratio(tp, tp + fn)
    specificity = ratio(tn, tn + fp)
    return {
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": ratio(tp, tp + fp),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": ratio(tp + tn, tp + tn + fp + fn),
        "balanced_accuracy": (sensitivity + specificity) / 2,
    }


def threshold_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """:data:`THRESHOLD_METRICS` of the decision ``p >= threshold``."""
    rates = rates_from_counts(*confusion_counts(y, p, threshold))
    return {name: float(rates[name]) for name in THRESHOLD_METRICS}


def brier_score(y: np.ndarray, p: np.ndarray) -> float:
    """Mean squared difference between probability and outcome (lower is better)."""
    return float(brier_score_loss(y, p, pos_label=1))


def calibration_bin(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin index in ``0..n_bins-1`` of each probability (1.0 falls in the last bin)."""
    return np.minimum((np.asarray(p, dtype=np.float64) * n_bins).astype(np.int64), n_bins - 1)


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int) -> float:
    """Expected calibration error with ``n_bins`` equal-width bins.

    ``sum_b (n_b / n) * |mean(p in b) - mean(y in b)|``, written as ``sum_b |sum p_b - sum y_b| / n`` so
    that the bootstrap can use summed counts.
    """
    bins = calibration_bin(p, n_bins)
    sum_p = np.bincount(bins, weights=p, minlength=n_bins)
    sum_y = np.bincount(bins, weights=np.asarray(y, dtype=np.float64), minlength=n_bins)
    return float(np.abs(sum_p - sum_y).sum() / len(p))
