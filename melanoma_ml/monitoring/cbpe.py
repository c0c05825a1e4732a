"""Confidence-based performance estimation (CBPE): AUC and sensitivity before any label arrives.

The published method (NannyML's CBPE; Kivimäki et al.): if the served probabilities are calibrated for the
population being scored, each case is a melanoma with probability ``p_i``, so every count of the confusion
matrix has a known expectation and each case counts as a *fractional* label, ``p_i`` melanoma and
``1 - p_i`` benign. NannyML itself does not fit this project's pinned stack (nannyml 0.13.1 requires
``lightgbm<4.6``, and pulls plotly, kaleido, FLAML, gcsfs and a telemetry client), so the method is here:

- expected sensitivity at the served decision: ``sum_{positive} p_i / sum_i p_i``;
- expected specificity: ``sum_{negative} (1 - p_i) / sum_i (1 - p_i)``;
- expected AUC: the Mann-Whitney AUC with fractional labels, the ratio of the expected number of correctly
  ordered (melanoma, benign) pairs to the expected number of such pairs,
  ``sum_{i != j} p_i (1 - p_j) [1(s_i > s_j) + 1/2 1(s_i = s_j)] / sum_{i != j} p_i (1 - p_j)``. A case is
  never paired with itself (it cannot be both). This is the area under NannyML's expected ROC curve
  (cumulative ``p`` against cumulative ``1 - p`` down the sorted scores) without its self-pairs.

The estimates are only as good as the calibration: they hold under covariate shift that leaves
``P(melanoma | score)`` intact and at the prevalence the probabilities were shifted to
(``serving.deployment_prevalence``); a new dermatoscope that breaks the calibration breaks them too, which
the score-shift and OOD checks of the monitor watch for. Labels (``deployed_performance``) settle it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from melanoma_ml.errors import InputValueError


@dataclass(frozen=True)
class PerformanceEstimate:
    """CBPE's estimates for one set of cases.

    Attributes:
        auc: Expected AUC (None when fewer than 2 cases or no expected melanoma/benign pair).
        sensitivity: Expected sensitivity at the served decisions (None when no expected melanoma).
        specificity: Expected specificity at the served decisions (None when no expected benign case).
        expected_melanoma_rate: Mean probability: the melanoma rate the probabilities imply.
        n: Cases.
    """

    auc: float | None
    sensitivity: float | None
    specificity: float | None
    expected_melanoma_rate: float
    n: int


def _probabilities(prob: object) -> np.ndarray:
    p = np.asarray(prob, dtype=float).ravel()
    if not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise InputValueError("CBPE needs calibrated probabilities in [0, 1]; drop missing or invalid scores")
    return p


def expected_auc(prob: object, score: object | None = None, weight: object | None = None) -> float | None:
    """Expected AUC of ``score`` (default: the probabilities themselves) with labels ``~ Bernoulli(prob)``.

    ``weight``: each case's multiplicity (a bootstrap resample's counts); copies of one case are one case,
    never paired with each other (None: every case once).
    """
    p = _probabilities(prob)
    s = p if score is None else np.asarray(score, dtype=float).ravel()
    w = np.ones(len(p)) if weight is None else np.asarray(weight, dtype=float).ravel()
    if s.shape != p.shape or w.shape != p.shape:
        raise InputValueError(
            f"got {len(p)} probabilities but {len(s)} scores / {len(w)} weights; one per case"
        )
    pos, neg = w * p, w * (1.0 - p)
    self_pairs = float(np.sum(pos * neg))
    pairs = float(pos.sum() * neg.sum()) - self_pairs
    if np.count_nonzero(w) < 2 or pairs <= 0:
        return None
    _, group = np.unique(s, return_inverse=True)  # ascending distinct scores
    pos_g = np.bincount(group, weights=pos)
    neg_g = np.bincount(group, weights=neg)
    below = np.concatenate([[0.0], np.cumsum(neg_g)[:-1]])  # expected benign mass at strictly lower scores
    ordered = float(np.sum(pos_g * below) + 0.5 * np.sum(pos_g * neg_g)) - 0.5 * self_pairs
    return ordered / pairs


def estimate_performance(prob: object, positive: object) -> PerformanceEstimate:
    """CBPE estimates for cases with served probabilities ``prob`` and served decisions ``positive``.

    Args:
        prob: Calibrated served probabilities (as logged).
        positive: The served decision per case (True: at or above the served threshold).
    """
    p = _probabilities(prob)
    flagged = np.asarray(positive, dtype=bool).ravel()
    if flagged.shape != p.shape:
        raise InputValueError(f"got {len(p)} probabilities but {len(flagged)} decisions; pass one per case")
    melanoma, benign = p.sum(), (1.0 - p).sum()
    return PerformanceEstimate(
        auc=expected_auc(p),
        sensitivity=float(p[flagged].sum() / melanoma) if melanoma > 0 else None,
        specificity=float((1.0 - p[~flagged]).sum() / benign) if benign > 0 else None,
        expected_melanoma_rate=float(p.mean()) if len(p) else float("nan"),
        n=len(p),
    )


def upper_bounds(
    prob: object, positive: object, *, quantile: float, n_resamples: int = 2000, seed: int = 0
) -> tuple[float | None, float | None]:
    """``quantile`` of the estimated AUC and sensitivity over case bootstrap resamples (seeded).

    How high the day's estimates could be by the luck of which cases came: the monitor warns of a drop
    only when even this bound is below the reference (``monitoring.p_value_warn``: ``quantile = 1 - p``).
    None where no resample gives an estimate.
    """
    p = _probabilities(prob)
    flagged = np.asarray(positive, dtype=bool).ravel()
    if flagged.shape != p.shape:
        raise InputValueError(f"got {len(p)} probabilities but {len(flagged)} decisions; pass one per case")
    rng = np.random.default_rng(seed)
    aucs, sensitivities = [], []
    for _ in range(n_resamples):
        weight = np.bincount(rng.integers(0, len(p), len(p)), minlength=len(p)).astype(float)
        auc = expected_auc(p, weight=weight)
        if auc is not None:
            aucs.append(auc)
        melanoma = float(np.sum(weight * p))
        if melanoma > 0:
            sensitivities.append(float(np.sum((weight * p)[flagged]) / melanoma))
    return (
        float(np.quantile(aucs, quantile)) if aucs else None,
        float(np.quantile(sensitivities, quantile)) if sensitivities else None,
    )
