"""monitor_day on constructed days: quiet in distribution, warning on every check for another clinic.

Measured with ``tests/monitor_helpers.py`` and the default ``monitoring`` settings over 200 seeds (a new
bundle every 10 days): in-distribution days of 100 cases warned on 1 of 200 (an estimated-AUC drop), of
200 cases on 1 of 200 (positive rate); shifted days of 100 cases warned on every one of the five checks in
200 of 200. In distribution (200 cases) the score PSI was 0.049 on average (largest 0.15) against 1.26
(smallest 0.91) shifted; the OOD-flag rate 0.010 (largest 0.035) against 0.20; the positive rate 0.52
against 0.88 (expected 0.51); the estimated AUC 0.85 against 0.72 (reference 0.85). The tests below use
400 in-distribution cases: over 100 seeds none warned, the score PSI was at most 0.084 and the metadata
PSIs at most 0.058 (half a warning level is 0.1), the estimated AUC at least 0.829 (reference 0.854).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import TEST_SEED
from monitor_helpers import IN_DISTRIBUTION, SHIFTED, day_of_log, served_manifest

from melanoma_ml.config import load_config
from melanoma_ml.monitoring.monitor import CHECKS, monitor_day
from melanoma_ml.monitoring.reference import reference_scores


@pytest.fixture(scope="module")
def manifest():
    return served_manifest(TEST_SEED)


@pytest.fixture(scope="module")
def config():
    return load_config("tiny")


def test_an_in_distribution_day_warns_about_nothing(manifest, config) -> None:
    report = monitor_day(day_of_log(manifest, IN_DISTRIBUTION, 400, 1000 + TEST_SEED), manifest, config)
    settings = config.monitoring
    assert report.judged and report.n_cases == 400
    assert report.warnings == ()
    assert report.score.psi < settings.score_psi_warn / 2
    assert all(shift.psi < settings.metadata_psi_warn / 2 for shift in report.metadata.values())
    assert set(report.metadata) == {"sex", "site", "age_band"}
    assert abs(report.positive_rate - report.expected_positive_rate) < settings.positive_rate_difference_warn
    assert report.ood_flag_rate < report.ood_expected_rate + settings.ood_rate_excess_warn
    assert report.reference_auc - report.estimated.auc < settings.estimated_auc_drop_warn


def test_a_shifted_day_warns_on_every_check_and_names_the_threshold(manifest, config) -> None:
    report = monitor_day(day_of_log(manifest, SHIFTED, 100, 2000 + TEST_SEED), manifest, config)
    assert {w.check for w in report.warnings} == set(CHECKS)
    score = report.warnings_for("score_shift")[0]
    assert score.threshold == config.monitoring.score_psi_warn and score.measured >= score.threshold
    assert "monitoring.score_psi_warn" in score.message
    assert {w.message.split(" mix")[0] for w in report.warnings_for("metadata_shift")} >= {"age_band"}
    assert "Warnings" in report.markdown() and report.metrics()["warnings"] == len(report.warnings)


def test_a_day_with_too_few_cases_is_measured_but_not_judged(manifest, config) -> None:
    report = monitor_day(day_of_log(manifest, SHIFTED, 20, TEST_SEED), manifest, config)
    assert not report.judged and report.warnings == ()
    assert report.score is not None and report.score.psi > config.monitoring.score_psi_warn  # measured
    assert any("too few cases" in note for note in report.notes)
    assert "too few cases to judge" in report.markdown()


def test_a_bundle_without_a_reference_still_measures_what_it_can(config) -> None:
    older = served_manifest(TEST_SEED, n_rows=500, with_reference=False)
    report = monitor_day(day_of_log(older, SHIFTED, 150, TEST_SEED), older, config)
    assert report.metadata == {}
    assert any("no reference in this bundle" in note for note in report.notes)
    assert {w.check for w in report.warnings} == set(CHECKS) - {"metadata_shift"}


def test_rows_of_another_version_are_left_out_and_counted(manifest, config) -> None:
    mine = day_of_log(manifest, IN_DISTRIBUTION, 30, TEST_SEED)
    other = day_of_log(manifest, SHIFTED, 12, TEST_SEED, version="v0000")
    report = monitor_day(pd.concat([mine, other], ignore_index=True), manifest, config)
    assert (report.n_cases, report.n_other_versions) == (30, 12)
    empty = monitor_day(other, manifest, config)
    assert empty.n_cases == 0 and empty.score is None and not empty.judged


def test_the_reference_moves_to_the_deployment_prevalence(manifest) -> None:
    own = reference_scores(manifest, None)
    rare = reference_scores(manifest, 0.05)
    target = np.asarray(manifest.oof.target)
    assert own.prevalence == pytest.approx(target.mean()) and np.allclose(own.weight, 1.0)
    assert np.sum(rare.weight * target) / np.sum(rare.weight) == pytest.approx(0.05)
    # decisions do not move with the prevalence (the threshold moves with the probabilities) ...
    assert (rare.sensitivity, rare.false_positive_rate) == pytest.approx(
        (own.sensitivity, own.false_positive_rate)
    )
    # ... but fewer melanomas mean fewer positive decisions
    assert rare.expected_positive_rate == pytest.approx(
        0.05 * own.sensitivity + 0.95 * own.false_positive_rate
    )
    assert rare.expected_positive_rate < own.expected_positive_rate
    assert np.all(rare.prob <= own.prob + 1e-12)
