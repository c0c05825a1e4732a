"""Shift measures with known answers: PSI of identical and of hand-computed pairs, KS against scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from melanoma_ml.errors import InputValueError
from melanoma_ml.monitoring.drift import (
    category_shift,
    ks_test,
    psi_from_shares,
    quantile_edges,
    score_shift,
    smoothed_shares,
)


def test_psi_of_two_share_vectors_is_the_hand_computed_value() -> None:
    # 50/50 -> 80/20: 0.3 ln(0.8/0.5) + (-0.3) ln(0.2/0.5)
    assert psi_from_shares([0.5, 0.5], [0.8, 0.2]) == pytest.approx(0.3 * math.log(1.6) - 0.3 * math.log(0.4))
    assert psi_from_shares([0.5, 0.5], [0.8, 0.2]) == pytest.approx(0.4159, abs=1e-4)


def test_psi_of_identical_sets_is_zero_and_the_ks_test_sees_no_difference() -> None:
    values = np.random.default_rng(0).beta(2, 5, 500)
    shift = score_shift(values, values)
    assert shift.psi == 0.0
    assert shift.p_value == pytest.approx(1.0)
    assert sum(shift.expected.values()) == pytest.approx(1.0) and len(shift.expected) == 10


def test_score_psi_of_a_known_shifted_pair_is_the_hand_computed_value() -> None:
    # Reference: 100 values, half at 0.2 (the median: the edge of 2 bins, (-inf, 0.2] and (0.2, inf)), half
    # at 0.7; current: 80 of 100 at 0.2.
    reference = np.r_[np.full(50, 0.2), np.full(50, 0.7)]
    current = np.r_[np.full(80, 0.2), np.full(20, 0.7)]
    shift = score_shift(current, reference, bins=2)
    e = np.array([50.5, 50.5]) / 101  # smoothed counts: (count + 1/2) / (n + 2 * 1/2)
    a = np.array([80.5, 20.5]) / 101
    assert shift.psi == pytest.approx(float(np.sum((a - e) * np.log(a / e))))
    assert shift.psi == pytest.approx(0.4063, abs=1e-4)  # 0.29703 ln(1.59406) - 0.29703 ln(0.40594)
    assert list(shift.observed.values()) == pytest.approx(a.tolist())


def test_quantile_edges_merge_ties_and_every_value_lands_in_a_bin() -> None:
    steps = np.repeat([0.1, 0.4, 0.9], [60, 30, 10])  # an isotonic calibrator's few distinct values
    edges = quantile_edges(steps, 10)
    assert list(edges) == [0.1, 0.4]  # bins (-inf, 0.1], (0.1, 0.4], (0.4, inf): 60 / 30 / 10 rows
    shift = score_shift(np.array([0.0, 0.95, 1.0]), steps)  # outside the reference's range: outer bins
    assert sum(shift.observed.values()) == pytest.approx(1.0)


def test_ks_p_value_matches_scipys_asymptotic_two_sample_test() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 300), rng.normal(0.3, 1, 700)
    d, p = ks_test(a, b)
    expected = stats.ks_2samp(a, b, method="asymp")
    assert d == pytest.approx(expected.statistic)
    assert p == pytest.approx(expected.pvalue, rel=1e-6)


def test_weighted_reference_equals_the_reference_with_rows_repeated() -> None:
    reference = np.array([0.1, 0.2, 0.6, 0.9])
    current = np.array([0.15, 0.25, 0.5, 0.95, 0.97])
    weighted = ks_test(current, reference, np.array([1.0, 3.0, 1.0, 3.0]))[0]
    repeated = ks_test(current, np.repeat(reference, [1, 3, 1, 3]))[0]
    assert weighted == pytest.approx(repeated)


def test_category_shift_counts_a_new_category_and_is_zero_on_the_reference_mix() -> None:
    reference = {"female": 0.5, "male": 0.5}
    same = category_shift({"female": 500, "male": 500}, reference, 1000)
    assert same.psi == pytest.approx(0.0, abs=1e-12) and same.p_value == pytest.approx(1.0)
    new = category_shift({"female": 40, "male": 40, "other": 20}, reference, 1000)
    assert set(new.expected) == {"female", "male", "other"} and new.psi > 0.2 and new.p_value < 1e-6
    e = smoothed_shares(np.array([500.0, 500.0, 0.0]))
    a = smoothed_shares(np.array([40.0, 40.0, 20.0]))
    assert new.psi == pytest.approx(float(np.sum((a - e) * np.log(a / e))))


def test_bad_inputs_are_refused_with_what_to_do() -> None:
    with pytest.raises(InputValueError, match="non-finite"):
        score_shift([0.1, np.nan], [0.1, 0.2])
    with pytest.raises(InputValueError, match="sum to 1"):
        category_shift({"a": 1}, {"a": 0.4}, 10)
    with pytest.raises(InputValueError, match="at least 2 bins"):
        quantile_edges([0.1, 0.2], 1)
