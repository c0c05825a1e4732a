"""Cluster bootstrap of melanoma_ml.evaluation: resampling groups, the vectorised weighted metrics, CIs."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_curve

from melanoma_ml.config import EvaluationConfig
from melanoma_ml.evaluation import weighted
from melanoma_ml.evaluation.bootstrap import bootstrap_overall, metric_key, percentile_interval
from melanoma_ml.evaluation.metrics import (
    brier_score,
    expected_calibration_error,
    partial_auc,
    roc_auc,
    threshold_metrics,
)
from melanoma_ml.evaluation.resample import draw_group_resamples
from melanoma_ml.evaluation.threshold import threshold_for_sensitivity

GRID = np.linspace(0, 1, 11)


def synthetic(n_groups: int, rows_per_group: int, seed: int = 0, signal: float = 1.2):
    """Labels, probabilities and group codes: patients with a shared risk, several images each."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_groups), rows_per_group)
    risk = rng.normal(size=n_groups)[groups]
    y = (rng.random(groups.size) < 1 / (1 + np.exp(-(risk - 1.5)))).astype(np.int8)
    p = 1 / (1 + np.exp(-(signal * y + 0.5 * risk + rng.normal(size=groups.size) - 1)))
    return y, p, groups


def test_resamples_draw_groups_with_replacement_reproducibly():
    y, _, groups = synthetic(50, 3)
    a = draw_group_resamples(y, groups, 200, seed=7)
    b = draw_group_resamples(y, groups, 200, seed=7)
    c = draw_group_resamples(y, groups, 200, seed=8)
    assert a.counts.shape == (200, 50)
    assert (a.counts.sum(axis=1) == 50).all()
    assert np.array_equal(a.counts, b.counts)
    assert not np.array_equal(a.counts, c.counts)
    assert (a.counts == 0).any() and (a.counts >= 2).any()  # with replacement


def test_single_class_resamples_are_redrawn_and_counted():
    groups = np.arange(20).repeat(2)
    y = np.zeros(40, dtype=int)
    y[0] = 1  # one patient of 20 has melanoma: ~36% of resamples miss it
    resamples = draw_group_resamples(y, groups, 300, seed=0)
    assert resamples.n_redrawn > 50
    assert (resamples.counts[:, 0] > 0).all()


def test_resampling_a_single_class_is_refused():
    with pytest.raises(ValueError, match="got only benign"):
        draw_group_resamples(np.zeros(6, dtype=int), np.arange(6), 100, seed=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [2, 6])
def test_weighted_metrics_equal_sklearn_on_duplicated_rows(seed, decimals):
    y, p, groups = synthetic(40, 4, seed)
    p = np.round(p, decimals)  # 2 decimals: heavy ties
    resamples = draw_group_resamples(y, groups, 8, seed)
    rows = weighted.WeightedRows(y, p, groups, resamples.n_groups)
    counts = resamples.counts
    P, N = rows.class_weights(counts)
    checks = {
        "auc": (weighted.auc(P, N), roc_auc),
        "pauc": (weighted.partial_auc(P, N, 0.8), lambda a, b: partial_auc(a, b, 0.8)),
        "threshold": (
            weighted.threshold_for_sensitivity(P, rows.scores, 0.9),
            lambda a, b: threshold_for_sensitivity(a, b, 0.9),
        ),
        "brier": (rows.brier(counts), brier_score),
        "ece": (rows.calibration_error(counts, 10), lambda a, b: expected_calibration_error(a, b, 10)),
        "f1@0.4": (rows.threshold_rates(counts, 0.4)["f1"], lambda a, b: threshold_metrics(a, b, 0.4)["f1"]),
        "specificity@0.4": (
            rows.threshold_rates(counts, 0.4)["specificity"],
            lambda a, b: threshold_metrics(a, b, 0.4)["specificity"],
        ),
    }
    for b in range(counts.shape[0]):
        take = np.repeat(np.arange(y.size), counts[b][groups])
        for name, (vectorised, reference) in checks.items():
            assert vectorised[b] == pytest.approx(reference(y[take], p[take]), abs=1e-12), (name, b)


def test_weighted_roc_matches_sklearn_curve_between_grid_points():
    y, p, groups = synthetic(30, 3, seed=4)
    counts = np.ones((1, 30))
    grid = np.linspace(0.00123, 0.99877, 37)  # off every k / n_benign vertex
    tpr = weighted.roc_tpr_at(*weighted.WeightedRows(y, p, groups, 30).class_weights(counts), grid)[:, 0]
    fpr_ref, tpr_ref, _ = roc_curve(y, p)
    assert tpr == pytest.approx(np.interp(grid, fpr_ref, tpr_ref), abs=1e-12)


def test_rows_without_melanoma_give_nan_not_a_number_that_looks_real():
    rows = weighted.WeightedRows(np.zeros(4, dtype=int), np.array([0.1, 0.2, 0.3, 0.4]), np.arange(4), 4)
    P, N = rows.class_weights(np.ones((2, 4)))
    for values in (
        weighted.auc(P, N),
        weighted.partial_auc(P, N, 0.8),
        weighted.threshold_for_sensitivity(P, rows.scores, 0.9),
    ):
        assert np.isnan(values).all()


def _overall(y, p, groups, n_resamples=200, seed=0):
    config = EvaluationConfig(n_bootstrap=n_resamples, bootstrap_seed=seed)
    resamples = draw_group_resamples(y, groups, n_resamples, seed)
    tuned = threshold_for_sensitivity(y, p, config.target_sensitivity)
    draws = bootstrap_overall(
        weighted.WeightedRows(y, p, groups, resamples.n_groups),
        resamples,
        operating_points={"tuned": tuned},
        config=config,
        fpr_grid=GRID,
    )
    return draws, tuned, config


def test_cis_contain_the_point_estimates():
    y, p, groups = synthetic(300, 4)
    draws, tuned, config = _overall(y, p, groups)
    point = {
        "auc": roc_auc(y, p),
        "pauc": partial_auc(y, p, config.pauc_min_tpr),
        "brier": brier_score(y, p),
        "ece": expected_calibration_error(y, p, config.ece_bins),
        "threshold": tuned,
        metric_key("sensitivity", "tuned"): threshold_metrics(y, p, tuned)["sensitivity"],
        metric_key("specificity", "tuned"): threshold_metrics(y, p, tuned)["specificity"],
    }
    for name, value in point.items():
        lo, hi = percentile_interval(draws.values[name], config.ci_level)
        assert lo <= value <= hi, name
        assert lo < hi, name
    assert draws.roc_tpr.shape == (GRID.size, 200)


def test_cis_shrink_with_more_patients():
    def auc_width(n_groups):
        y, p, groups = synthetic(n_groups, 3, seed=1)
        draws, _, config = _overall(y, p, groups)
        lo, hi = percentile_interval(draws.values["auc"], config.ci_level)
        return hi - lo

    assert auc_width(2000) < 0.6 * auc_width(200)


def test_cluster_bootstrap_is_wider_than_a_row_bootstrap_when_rows_repeat_within_patients():
    y, p, groups = synthetic(150, 1, seed=2)
    copies = 20  # every patient's image duplicated: no new information, 20x the rows
    y, p, groups = np.repeat(y, copies), np.repeat(p, copies), np.repeat(groups, copies)
    cluster, _, config = _overall(y, p, groups)
    rows, _, _ = _overall(y, p, np.arange(y.size))  # each row its own group = row bootstrap
    cluster_width = np.subtract(*percentile_interval(cluster.values["auc"], config.ci_level)[::-1])
    row_width = np.subtract(*percentile_interval(rows.values["auc"], config.ci_level)[::-1])
    assert cluster_width > 2.5 * row_width  # about sqrt(20) ~ 4.5 expected


def test_percentile_interval_ignores_nan_and_reports_nan_when_empty():
    assert percentile_interval(np.array([np.nan, 1.0, 2.0, 3.0]), 0.5) == pytest.approx((1.5, 2.5))
    assert all(np.isnan(percentile_interval(np.array([np.nan]), 0.95)))


def test_speed_of_1000_resamples_on_33k_rows_and_2k_patients(record_property):
    """Measures (does not assert) the time; the figure goes in the report to the lead."""
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 2000, 33_000)
    y = (rng.random(33_000) < 0.02 + 0.02 * (groups % 3 == 0)).astype(np.int8)
    p = 1 / (1 + np.exp(-(1.5 * y + rng.normal(size=33_000) - 3)))
    start = time.perf_counter()
    draws, tuned, config = _overall(y, p, groups, n_resamples=1000)
    elapsed = time.perf_counter() - start
    record_property("bootstrap_1000x33k_seconds", round(elapsed, 2))
    print(f"\n1000 cluster-bootstrap resamples, 33,000 rows, 2,000 groups, all metrics: {elapsed:.2f} s")
    assert isinstance(draws.values, pd.DataFrame) and len(draws.values) == 1000
    assert np.isfinite(draws.values["auc"]).all()
