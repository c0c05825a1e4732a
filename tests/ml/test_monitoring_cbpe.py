"""CBPE: known answers, and labels drawn from the probabilities land within a measured margin."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TEST_SEED
from scipy import special
from sklearn.metrics import roc_auc_score

from melanoma_ml.errors import InputValueError
from melanoma_ml.monitoring.cbpe import estimate_performance, expected_auc, upper_bounds

N_CASES = 1000
AUC_MARGIN = 0.08
SENSITIVITY_MARGIN = 0.13
"""Estimate minus realised value, labels drawn from the probabilities (expit(N(-1.5, 1.5)), 1000 cases,
threshold at the 70th percentile), measured over seeds 0-399 of this test's draw: AUC mean -0.0001, sd 0.0150, largest 0.045; sensitivity mean -0.0010, sd 0.0255, largest 0.090. The
margins are about 5 sd."""


def test_known_answers() -> None:
    assert expected_auc(np.full(10, 0.5)) == pytest.approx(0.5)  # no ranking information
    assert expected_auc([0.0, 0.0, 1.0, 1.0]) == pytest.approx(1.0)  # certain labels, perfectly ranked
    # two cases: (melanoma 0.8 over benign 0.2) has weight 0.8 * 0.8, the reversed pair 0.2 * 0.2
    assert expected_auc([0.2, 0.8]) == pytest.approx(0.64 / 0.68)
    assert expected_auc([0.3]) is None and expected_auc([0.0, 0.0]) is None
    estimate = estimate_performance([0.9, 0.6, 0.2, 0.1], [True, True, False, False])
    assert estimate.sensitivity == pytest.approx(1.5 / 1.8)
    assert estimate.specificity == pytest.approx(1.7 / 2.2)
    assert estimate.expected_melanoma_rate == pytest.approx(0.45)


def test_copies_of_a_case_are_never_paired_with_each_other() -> None:
    p = np.array([0.2, 0.5, 0.8])
    # case 1 twice: its two copies tie but are one case, so the pair is left out (not counted as half)
    weighted = expected_auc(p, weight=[1.0, 2.0, 1.0])
    pos, neg = np.array([0.2, 1.0, 0.8]), np.array([0.8, 1.0, 0.2])  # weight * p, weight * (1 - p)
    ordered = pos[1] * neg[0] + pos[2] * (neg[0] + neg[1])  # 0.8 + 0.8 * 1.8 = 2.24
    # every pair of different cases: all pairs less each case with itself and its copies (w^2 p (1 - p))
    pairs = pos.sum() * neg.sum() - np.sum(pos * neg)  # 4 - (0.16 + 1 + 0.16) = 2.68
    assert weighted == pytest.approx(2.24 / 2.68) == pytest.approx(ordered / pairs)


@pytest.mark.parametrize("offset", range(5))
def test_estimates_land_near_the_realised_values_when_labels_follow_the_probabilities(offset: int) -> None:
    rng = np.random.default_rng(1000 * TEST_SEED + offset)
    p = special.expit(rng.normal(-1.5, 1.5, N_CASES))
    y = rng.random(N_CASES) < p
    flagged = p >= np.quantile(p, 0.7)
    estimate = estimate_performance(p, flagged)
    assert abs(estimate.auc - roc_auc_score(y, p)) < AUC_MARGIN
    assert abs(estimate.sensitivity - flagged[y].mean()) < SENSITIVITY_MARGIN


def test_bootstrap_upper_bounds_sit_above_the_estimates() -> None:
    rng = np.random.default_rng(TEST_SEED)
    p = special.expit(rng.normal(-1.5, 1.5, 200))
    flagged = p >= np.quantile(p, 0.7)
    estimate = estimate_performance(p, flagged)
    auc_upper, sensitivity_upper = upper_bounds(p, flagged, quantile=0.99, n_resamples=300)
    assert estimate.auc < auc_upper < 1.0
    assert estimate.sensitivity < sensitivity_upper <= 1.0


def test_invalid_probabilities_are_refused() -> None:
    with pytest.raises(InputValueError, match=r"\[0, 1\]"):
        estimate_performance([0.2, 1.2], [True, False])
    with pytest.raises(InputValueError, match="one per case"):
        estimate_performance([0.2, 0.3], [True])
