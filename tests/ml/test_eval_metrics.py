"""Point metrics, threshold tuning and input validation of melanoma_ml.evaluation (hand-computed cases)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from melanoma_ml.evaluation.inputs import validate_predictions
from melanoma_ml.evaluation.metrics import (
    brier_score,
    expected_calibration_error,
    partial_auc,
    rates_from_counts,
    roc_auc,
    threshold_metrics,
)
from melanoma_ml.evaluation.threshold import threshold_for_sensitivity

Y4 = np.array([0, 0, 1, 1])


@pytest.mark.parametrize(
    ("name", "y", "p", "auc", "pauc"),
    [
        ("perfect", Y4, [0.1, 0.2, 0.8, 0.9], 1.0, 0.2),
        ("inverted", Y4, [0.9, 0.8, 0.2, 0.1], 0.0, 0.0),
        # pairs: .2 beats .1, loses to .4; .3 beats .1, loses to .4 -> 0.5; flipped ROC flat at y=.5 -> .5*.2
        ("random order", [0, 1, 1, 0], [0.1, 0.2, 0.3, 0.4], 0.5, 0.1),
        ("all tied", Y4, [0.5, 0.5, 0.5, 0.5], 0.5, 0.5 * 0.2**2),
        # pairs (melanoma, benign): (.2,.2) tie=.5, (.2,.1)=1, (.3,.2)=1, (.3,.1)=1 -> 3.5/4
        ("ties", [0, 1, 0, 1], [0.2, 0.2, 0.1, 0.3], 0.875, None),
        ("one miss", [0, 0, 1, 1], [0.1, 0.6, 0.5, 0.9], 0.75, None),
    ],
)
def test_auc_and_partial_auc_hand_cases(name, y, p, auc, pauc):
    y, p = np.asarray(y), np.asarray(p, dtype=float)
    assert roc_auc(y, p) == pytest.approx(auc), name
    if pauc is not None:
        assert partial_auc(y, p, 0.8) == pytest.approx(pauc, abs=1e-12), name


def _isic_formula(y, p, min_tpr):
    v_gt = abs(np.asarray(y) - 1)
    v_pred = -np.asarray(p)
    max_fpr = 1 - min_tpr
    s = skm.roc_auc_score(v_gt, v_pred, max_fpr=max_fpr)
    return 0.5 * max_fpr**2 + (max_fpr - 0.5 * max_fpr**2) / (1.0 - 0.5) * (s - 0.5)


def _area_above_tpr(y, p, min_tpr, points=400_001):
    """Independent geometry: area between the ROC and the line TPR = min_tpr, by dense integration."""
    fpr, tpr, _ = skm.roc_curve(y, p)
    grid = np.linspace(0, 1, points)
    return np.trapezoid(np.maximum(np.interp(grid, fpr, tpr) - min_tpr, 0), grid)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("min_tpr", [0.8, 0.5])
def test_partial_auc_matches_the_isic_formula_and_the_region_above_min_tpr(seed, min_tpr):
    rng = np.random.default_rng(seed)
    y = (rng.random(300) < 0.3).astype(int)
    p = np.round(np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1), 2)  # rounded: many ties
    value = partial_auc(y, p, min_tpr)
    assert value == pytest.approx(_isic_formula(y, p, min_tpr), abs=1e-12)
    assert value == pytest.approx(_area_above_tpr(y, p, min_tpr), abs=1e-4)
    assert 0 <= value <= 1 - min_tpr


def test_threshold_metrics_hand_case():
    # p >= .5 -> called [1,0,1,0,1]; tp=2 fn=1 fp=1 tn=1
    got = threshold_metrics(np.array([1, 1, 0, 0, 1]), np.array([0.9, 0.4, 0.6, 0.1, 0.7]), 0.5)
    assert got == pytest.approx(
        {
            "sensitivity": 2 / 3,
            "specificity": 1 / 2,
            "precision": 2 / 3,
            "f1": 2 / 3,
            "accuracy": 3 / 5,
            "balanced_accuracy": 7 / 12,
        }
    )


def test_threshold_metrics_equal_sklearn_on_random_data():
    rng = np.random.default_rng(3)
    y = (rng.random(500) < 0.2).astype(int)
    p = rng.random(500)
    called = (p >= 0.4).astype(int)
    got = threshold_metrics(y, p, 0.4)
    expected = {
        "sensitivity": skm.recall_score(y, called),
        "specificity": skm.recall_score(y, called, pos_label=0),
        "precision": skm.precision_score(y, called),
        "f1": skm.f1_score(y, called),
        "accuracy": skm.accuracy_score(y, called),
        "balanced_accuracy": skm.balanced_accuracy_score(y, called),
    }
    assert got == pytest.approx(expected)


def test_rates_with_a_zero_denominator_are_nan_not_zero():
    rates = rates_from_counts(tp=0, fp=0, tn=5, fn=3)  # nothing called melanoma
    assert math.isnan(rates["precision"])
    assert rates["sensitivity"] == 0 and rates["f1"] == 0 and rates["specificity"] == 1


@pytest.mark.parametrize(
    ("y", "p", "brier", "ece"),
    [
        ([0, 0, 1, 1], [0.0, 0.0, 1.0, 1.0], 0.0, 0.0),
        ([0, 0, 0, 1], [0.25, 0.25, 0.25, 0.25], 0.1875, 0.0),  # calibrated but uninformative
        # bin 1: sum p .2 vs 1 melanoma -> .8; bin 9: sum p 1.8 vs 2 -> .2; (0.8 + 0.2) / 4
        ([0, 1, 1, 1], [0.1, 0.1, 0.9, 0.9], (0.01 + 0.81 + 0.01 + 0.01) / 4, 0.25),
        ([1, 0], [1.0, 0.0], 0.0, 0.0),  # 1.0 falls in the last bin
    ],
)
def test_brier_and_expected_calibration_error(y, p, brier, ece):
    y, p = np.asarray(y), np.asarray(p)
    assert brier_score(y, p) == pytest.approx(brier)
    assert expected_calibration_error(y, p, 10) == pytest.approx(ece)


@pytest.mark.parametrize(("y", "only"), [([0, 0, 0], "only 3 benign"), ([1, 1], "only 2 melanoma")])
def test_single_class_has_a_clear_error(y, only):
    with pytest.raises(ValueError, match=f"AUC needs both melanoma and benign cases.*{only}"):
        roc_auc(np.asarray(y), np.linspace(0, 1, len(y)))


@pytest.mark.parametrize(
    ("y", "p", "target", "expected"),
    [
        ([1, 1, 1, 1, 0], [0.9, 0.8, 0.7, 0.6, 0.5], 0.75, 0.7),
        ([1, 1, 1, 1, 0], [0.9, 0.8, 0.7, 0.6, 0.5], 0.5, 0.8),
        ([1, 1, 1, 1, 0], [0.9, 0.8, 0.7, 0.6, 0.5], 1.0, 0.6),
        ([1, 1, 1, 1, 0], [0.9, 0.8, 0.7, 0.6, 0.5], 0.76, 0.6),
        ([1, 1, 1, 0], [0.8, 0.8, 0.3, 0.9], 0.6, 0.8),  # tie: 0.8 keeps 2 of 3
        ([1, 1, 1, 0], [0.8, 0.8, 0.3, 0.9], 0.7, 0.3),
        # 27 of 30 is exactly 0.9 although 0.9 * 30 > 27 in floating point
        ([1] * 30, list(np.linspace(1, 0.01, 30)), 0.9, np.linspace(1, 0.01, 30)[26]),
    ],
)
def test_threshold_for_sensitivity(y, p, target, expected):
    assert threshold_for_sensitivity(np.asarray(y), np.asarray(p), target) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(5))
def test_tuned_threshold_is_the_largest_reaching_the_target(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(200) < 0.25).astype(int)
    p = np.round(rng.random(200), 2)
    t = threshold_for_sensitivity(y, p, 0.9)
    assert threshold_metrics(y, p, t)["sensitivity"] >= 0.9
    higher = np.unique(p[p > t])
    if higher.size:
        assert threshold_metrics(y, p, higher[0])["sensitivity"] < 0.9


def test_threshold_needs_melanoma_cases():
    with pytest.raises(ValueError, match="without melanoma cases"):
        threshold_for_sensitivity(np.zeros(3), np.ones(3), 0.9)


def _oof(**changes) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "image_name": ["ISIC_0", "ISIC_1", "ISIC_2", "ISIC_3"],
            "group_id": ["IP_a", "IP_a", "IP_b", "IP_c"],
            "target": [0, 1, 0, 1],
            "prob": [0.1, 0.8, 0.3, 0.7],
            "fold": [0, 0, 1, 1],
        }
    )
    for column, (row, value) in changes.items():
        frame[column] = frame[column].astype(object)
        frame.loc[row, column] = value
    return frame


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (_oof().drop(columns=["prob"]), r"lack column\(s\) \['prob'\]"),
        (_oof().iloc[:0], "empty"),
        (_oof(prob=(2, float("nan"))), r"missing or non-numeric prob in row 2 \(ISIC_2\)"),
        (_oof(prob=(1, "high")), r"row 1 \(ISIC_1\)"),
        (_oof(prob=(3, 2.7)), r"outside \[0, 1\] in row 3 \(ISIC_3\).*sigmoid"),
        (_oof(target=(0, 2)), r"other than 0/1 in row 0 \(ISIC_0\)"),
        (_oof(image_name=(1, "ISIC_0")), r"more than once: row 0 \(ISIC_0\), row 1 \(ISIC_0\)"),
        (_oof(group_id=(2, None)), r"no group_id in row 2 \(ISIC_2\)"),
    ],
)
def test_bad_predictions_are_rejected_naming_rows(frame, message):
    with pytest.raises(ValueError, match=message):
        validate_predictions(frame)


def test_valid_predictions_come_back_typed_and_complete():
    raw = _oof()
    raw.index = [10, 11, 12, 13]
    clean = validate_predictions(raw)
    assert list(clean.index) == [0, 1, 2, 3]
    assert clean["target"].dtype == np.int8 and clean["prob"].dtype == np.float64
    assert list(clean.columns) == list(raw.columns)
