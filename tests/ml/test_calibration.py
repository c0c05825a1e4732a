"""Post-hoc calibration and prior shift (melanoma_ml.evaluation.calibration) on simulated predictions.

The simulations draw a score ``x | y ~ N(SEPARATION * y, 1)``, so the true melanoma probability at
prevalence ``pi`` is known in closed form: ``logit = logit(pi) + SEPARATION * x - SEPARATION**2 / 2``.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit
from sklearn.isotonic import IsotonicRegression

from melanoma_ml import schema
from melanoma_ml.config import EvaluationConfig
from melanoma_ml.errors import InputValueError
from melanoma_ml.evaluation.calibration import (
    METHODS,
    UNCALIBRATED,
    IsotonicCalibrator,
    PlattScaling,
    TemperatureScaling,
    calibration_report,
    calibrator_from_dict,
    choose_calibrator,
    cross_fitted_predictions,
    fit_calibrator,
    logit,
    shift_prior,
)
from melanoma_ml.evaluation.estimate import Estimate
from melanoma_ml.evaluation.metrics import expected_calibration_error, roc_auc

SEPARATION = 1.5
TRAIN_PREVALENCE = 0.24
DEPLOY_PREVALENCE = 0.09
IMAGES_PER_PATIENT = 10


def _log_odds(p: float) -> float:
    return math.log(p / (1 - p))


def _simulate(n: int, prevalence: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and the TRUE (perfectly calibrated) melanoma probability at ``prevalence``."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(np.int8)
    x = rng.normal(SEPARATION * y, 1.0)
    return y, expit(_log_odds(prevalence) + SEPARATION * x - SEPARATION**2 / 2)


def _oof_table(y: np.ndarray, p: np.ndarray) -> pd.DataFrame:
    n = y.size
    return pd.DataFrame(
        {
            schema.IMAGE: [f"ISIC_{i:07d}" for i in range(n)],
            schema.GROUP: [f"P{i // IMAGES_PER_PATIENT:06d}" for i in range(n)],
            schema.TARGET: y,
            "prob": p,
        }
    )


def _miscalibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """At 9% prevalence, a model that reports probabilities as if melanoma were 24% common, over-confidently
    (the production symptom: mean predicted ~0.24 at a ~0.09 melanoma rate)."""
    y, p_true = _simulate(n, DEPLOY_PREVALENCE, seed)
    shifted = logit(p_true) + _log_odds(TRAIN_PREVALENCE) - _log_odds(DEPLOY_PREVALENCE)
    return y, expit(1.4 * shifted)


@pytest.mark.parametrize("true_temperature", [0.5, 2.0])
def test_temperature_scaling_recovers_a_known_temperature(true_temperature):
    y, p_true = _simulate(40_000, 0.3, seed=1)
    reported = expit(logit(p_true) * true_temperature)  # T > 1: over-confident, T < 1: under-confident

    fitted = TemperatureScaling.fit(reported, y)

    assert fitted.temperature == pytest.approx(true_temperature, rel=0.05)
    assert np.abs(fitted.apply(reported) - p_true).max() < 0.03


def test_platt_scaling_recovers_a_known_slope_and_intercept():
    y, p_true = _simulate(40_000, 0.3, seed=2)
    reported = expit((logit(p_true) - 0.8) / 0.6)  # p_true = sigmoid(0.6 * logit(reported) + 0.8)

    fitted = PlattScaling.fit(reported, y)

    assert fitted.slope == pytest.approx(0.6, rel=0.05)
    assert fitted.intercept == pytest.approx(0.8, abs=0.06)


@pytest.mark.parametrize("method", ["temperature", "platt"])
def test_parametric_calibrators_keep_the_ranking(method):
    y, p = _miscalibrated(3_000, seed=3)
    calibrated = fit_calibrator(method, p, y).apply(p)
    assert roc_auc(y, calibrated) == pytest.approx(roc_auc(y, p), abs=1e-12)


def test_isotonic_is_monotone_clips_and_matches_sklearn():
    y, p = _miscalibrated(5_000, seed=4)
    calibrator = IsotonicCalibrator.fit(p, y)

    grid = np.linspace(0.0, 1.0, 10_001)
    mapped = calibrator.apply(grid)
    assert (np.diff(mapped) >= 0).all()
    assert mapped.min() >= 0.0 and mapped.max() <= 1.0
    assert mapped[0] == calibrator.y[0] and mapped[-1] == calibrator.y[-1]  # clipped outside the fit range
    reference = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(p, y)
    np.testing.assert_allclose(mapped, reference.predict(grid), atol=1e-12)


def test_prior_shift_is_the_identity_when_prevalences_match():
    p = np.array([0.0, 1e-9, 0.01, 0.3, 0.5, 0.97, 1.0])
    np.testing.assert_array_equal(shift_prior(p, 0.24, 0.24), p)
    there_and_back = shift_prior(shift_prior(p, 0.24, 0.09), 0.09, 0.24)
    np.testing.assert_allclose(there_and_back, p, atol=1e-12)
    assert shift_prior(p, 0.24, 0.09)[[0, -1]].tolist() == [0.0, 1.0]


def test_prior_shift_matches_the_melanoma_rate_of_a_resampled_test_set():
    """A calibrated model at 24% melanoma, scored on the same population resampled to 9% melanoma."""
    y, p = _simulate(200_000, TRAIN_PREVALENCE, seed=5)
    rng = np.random.default_rng(6)
    n = 40_000
    n_pos = round(DEPLOY_PREVALENCE * n)
    keep = np.concatenate(
        [
            rng.choice(np.flatnonzero(y == 1), n_pos, replace=False),
            rng.choice(np.flatnonzero(y == 0), n - n_pos, replace=False),
        ]
    )
    y_new, p_new = y[keep], p[keep]

    shifted = shift_prior(p_new, TRAIN_PREVALENCE, DEPLOY_PREVALENCE)

    assert p_new.mean() > 0.13  # unshifted, the mean is far off the 9% rate
    assert shifted.mean() == pytest.approx(y_new.mean(), abs=0.005)
    unshifted_ece = expected_calibration_error(y_new, p_new, 10)
    assert unshifted_ece > 0.04  # calibrated at 24%, miscalibrated at 9%
    assert expected_calibration_error(y_new, shifted, 10) < min(0.015, unshifted_ece / 3)


def test_calibrate_at_the_training_prevalence_then_shift_to_deployment():
    """The intended use: calibrator fitted on out-of-fold rows (24%), then prior shift to the site (9%)."""
    y, p_true = _simulate(20_000, TRAIN_PREVALENCE, seed=7)
    reported = expit(1.4 * logit(p_true) + 0.5)  # over-confident and too high
    choice = choose_calibrator(_oof_table(y, reported), seed=0)

    y_site, p_site_true = _simulate(40_000, DEPLOY_PREVALENCE, seed=8)
    # the same model on site images: reported from the site's own true probability moved to 24%
    reported_site = expit(1.4 * logit(shift_prior(p_site_true, DEPLOY_PREVALENCE, TRAIN_PREVALENCE)) + 0.5)
    served = shift_prior(choice.calibrator.apply(reported_site), choice.prevalence, DEPLOY_PREVALENCE)

    assert reported_site.mean() > 0.2
    assert served.mean() == pytest.approx(y_site.mean(), abs=0.01)
    calibrated_only = choice.calibrator.apply(reported_site)  # right at 24%, not at the site's 9%
    assert (
        expected_calibration_error(y_site, served, 10)
        < expected_calibration_error(y_site, calibrated_only, 10) / 2
    )


@pytest.mark.parametrize("method", METHODS)
def test_serialisation_round_trips_exactly_through_json(method):
    y, p = _miscalibrated(2_000, seed=9)
    calibrator = fit_calibrator(method, p, y)

    text = json.dumps(calibrator.to_dict(), allow_nan=False)
    restored = calibrator_from_dict(json.loads(text))

    assert restored == calibrator
    assert type(restored) is type(calibrator)
    probe = np.linspace(0, 1, 1_001)
    np.testing.assert_array_equal(restored.apply(probe), calibrator.apply(probe))
    assert json.loads(text)["method"] == method


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"method": "beta", "a": 1.0}, "expected one of"),
        ({"temperature": 1.0}, "expected one of"),
        ({"method": "temperature"}, "lacks ['temperature']"),
        ({"method": "temperature", "temperature": -1.0}, "must be > 0"),
        ({"method": "platt", "slope": "1", "intercept": 0.0}, "finite number"),
        ({"method": "platt", "slope": float("nan"), "intercept": 0.0}, "finite number"),
        ({"method": "isotonic", "x": [0.1, 0.5], "y": [0.6, 0.2]}, "non-decreasing"),
        ({"method": "isotonic", "x": [0.1], "y": [0.6, 0.2]}, "equal, non-empty"),
    ],
)
def test_reading_a_broken_calibrator_says_what_is_wrong(data, message):
    with pytest.raises(InputValueError, match=re.escape(message)):
        calibrator_from_dict(data)


def test_fitting_refuses_a_single_class_and_bad_probabilities():
    with pytest.raises(InputValueError, match="both melanoma and benign"):
        PlattScaling.fit([0.2, 0.3], [0, 0])
    with pytest.raises(InputValueError, match="apply a sigmoid"):
        TemperatureScaling.fit([0.2, 1.3], [0, 1])
    with pytest.raises(InputValueError, match="strictly between 0 and 1"):
        shift_prior([0.2], 0.24, 0.0)
    with pytest.raises(InputValueError, match="unknown calibration method"):
        fit_calibrator("beta", [0.2, 0.3], [0, 1])


def test_choose_calibrator_picks_the_lowest_cross_fitted_nll():
    y, p = _miscalibrated(9_000, seed=10)
    choice = choose_calibrator(_oof_table(y, p), seed=3)
    table = choice.table

    assert set(table["method"]) == {UNCALIBRATED, *METHODS}
    assert table["chosen"].sum() == 1
    chosen = table[table["chosen"]].iloc[0]
    candidates = table[table["method"] != UNCALIBRATED]
    assert chosen["nll"] == candidates["nll"].min()
    assert choice.calibrator.method == chosen["method"]
    # temperature scaling cannot move the level (no intercept), so it must lose on a prevalence mismatch
    assert chosen["method"] != "temperature"
    assert candidates.set_index("method").loc["temperature", "nll"] > chosen["nll"]
    assert choice.prevalence == pytest.approx(y.mean())
    uncalibrated = table.set_index("method").loc[UNCALIBRATED]
    assert uncalibrated["mean_prob"] > 0.15
    assert chosen["mean_prob"] == pytest.approx(y.mean(), abs=0.01)
    assert chosen["ece"] < uncalibrated["ece"] / 3


def test_choose_calibrator_is_reproducible_and_checks_its_inputs():
    y, p = _miscalibrated(1_500, seed=11)
    oof = _oof_table(y, p)
    first = choose_calibrator(oof, methods=("platt", "isotonic"), seed=4)
    again = choose_calibrator(oof, methods=("platt", "isotonic"), seed=4)
    pd.testing.assert_frame_equal(first.table, again.table)
    assert first.calibrator == again.calibrator

    with pytest.raises(InputValueError, match="non-empty subset"):
        choose_calibrator(oof, methods=("beta",))
    with pytest.raises(InputValueError, match="lack the group column"):
        choose_calibrator(oof, groups="patient_id")
    with pytest.raises(InputValueError, match="as many patients"):
        choose_calibrator(oof.head(9), n_splits=5)


def test_cross_fitting_never_fits_on_the_patient_it_predicts():
    """One patient whose 100 images all score 0.99 and are all benign: an in-sample isotonic fit learns that
    0.99 means benign; fitted without that patient, 0.99 sits at the top of the others' melanoma curve."""
    y, p = _miscalibrated(3_000, seed=12)
    p = np.minimum(p, 0.95)
    y_all = np.concatenate([y, np.zeros(100, dtype=np.int8)])
    p_all = np.concatenate([p, np.full(100, 0.99)])
    groups = np.concatenate([np.arange(y.size) // IMAGES_PER_PATIENT, np.full(100, -1)])

    in_sample = IsotonicCalibrator.fit(p_all, y_all).apply(p_all[-100:])
    crossed = cross_fitted_predictions(p_all, y_all, groups, ["isotonic"], n_splits=5, seed=0)["isotonic"]

    assert in_sample.max() < 0.4
    assert crossed[-100:].min() > 0.8
    assert np.isfinite(crossed).all()


def test_calibration_report_shows_ece_dropping_with_paired_cis():
    y, p = _miscalibrated(6_000, seed=13)
    groups = np.arange(y.size) // IMAGES_PER_PATIENT
    after = cross_fitted_predictions(p, y, groups, ["platt"], n_splits=5, seed=0)["platt"]
    config = EvaluationConfig(n_bootstrap=200, bootstrap_seed=1)

    report = calibration_report(p, after, y, groups, config)

    assert set(report) == {
        "ece_before",
        "ece_after",
        "ece_change",
        "brier_before",
        "brier_after",
        "brier_change",
        "mean_prob_before",
        "mean_prob_after",
        "observed_rate",
    }
    estimates = {name: Estimate.from_dict(d, where=name) for name, d in report.items()}
    for name, estimate in estimates.items():
        assert estimate.level == config.ci_level
        assert estimate.lo <= estimate.value <= estimate.hi, name
    assert estimates["ece_before"].value > 0.05
    assert estimates["ece_after"].value < estimates["ece_before"].value / 3
    assert estimates["ece_change"].hi < 0  # paired: better beyond patient-resampling noise
    assert estimates["brier_change"].hi < 0
    assert estimates["observed_rate"].value == pytest.approx(y.mean())
    assert estimates["mean_prob_before"].lo > estimates["observed_rate"].hi
    assert estimates["mean_prob_after"].value == pytest.approx(y.mean(), abs=0.01)
    assert json.loads(json.dumps(report)) == report


def test_calibration_report_checks_lengths():
    y, p = _miscalibrated(300, seed=14)
    with pytest.raises(InputValueError, match="same length"):
        calibration_report(p, p[:-1], y, np.arange(y.size), EvaluationConfig(n_bootstrap=50))
    with pytest.raises(InputValueError, match="one per probability"):
        calibration_report(p, p, y, np.arange(y.size - 1), EvaluationConfig(n_bootstrap=50))
