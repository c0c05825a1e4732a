"""Estimate: the one shape of a value with its CI; its dict round trip, old dicts, and its text."""

from __future__ import annotations

import json
import math

import pytest

from melanoma_ml.config import EvaluationConfig
from melanoma_ml.errors import MelanomaInputError
from melanoma_ml.evaluation.estimate import DEFAULT_CI_LEVEL, Estimate, level_text

NAN = float("nan")


@pytest.mark.parametrize(
    "estimate",
    [Estimate(0.81, 0.78, 0.85, 0.95), Estimate(0.5, NAN, NAN, 0.9), Estimate(NAN, NAN, NAN, 0.99)],
    ids=["finite", "no-ci", "no-value"],
)
def test_dict_round_trip_is_strict_json(estimate: Estimate) -> None:
    data = json.loads(json.dumps(estimate.to_dict(), allow_nan=False))
    assert set(data) == {"value", "lo", "hi", "level"}
    again = Estimate.from_dict(data)
    assert again.level == estimate.level
    for name in ("value", "lo", "hi"):
        a, b = getattr(again, name), getattr(estimate, name)
        assert a == b or (math.isnan(a) and math.isnan(b)), name


def test_a_dict_stored_before_levels_were_stored_reads_the_default_or_the_given_level() -> None:
    old = {"value": 0.81, "lo": 0.78, "hi": 0.85}
    assert Estimate.from_dict(old) == Estimate(0.81, 0.78, 0.85, DEFAULT_CI_LEVEL)
    assert EvaluationConfig().ci_level == DEFAULT_CI_LEVEL  # one home for the default
    assert Estimate.from_dict(old, default_level=0.9).level == 0.9
    assert Estimate.from_dict({**old, "level": 0.8}, default_level=0.9).level == 0.8


def test_the_paired_difference_dict_is_read_too() -> None:
    paired = {"diff": -0.02, "lo": -0.05, "hi": 0.01, "ci_level": 0.9, "p_value": 0.3}
    assert Estimate.from_dict(paired) == Estimate(-0.02, -0.05, 0.01, 0.9)


def test_an_estimate_is_returned_as_is() -> None:
    estimate = Estimate(0.1, 0.0, 0.2, 0.95)
    assert Estimate.from_dict(estimate) is estimate


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (0.8, "auc must be a dict"),
        ({"value": 0.8, "lo": 0.7}, r"auc lacks \['hi'\]"),
        ({"value": "x", "lo": 0.7, "hi": 0.9}, "auc holds a non-number"),
        ({"value": True, "lo": 0.7, "hi": 0.9}, "auc holds a non-number"),
        ({"value": 0.8, "lo": 0.9, "hi": 0.7}, "lo > hi"),
        ({"value": 0.8, "lo": 0.7, "hi": 0.9, "level": 95}, "CI level 95; a level is a fraction"),
    ],
    ids=["not-dict", "missing", "text", "bool", "disordered", "percent-level"],
)
def test_malformed_dicts_are_input_errors_that_name_the_entry(data, message) -> None:
    with pytest.raises(MelanomaInputError, match=message):
        Estimate.from_dict(data, where="auc")


@pytest.mark.parametrize(
    ("estimate", "text"),
    [
        (Estimate(0.81, 0.78, 0.85, 0.95), "0.810 [0.780, 0.850] (95% CI)"),
        (Estimate(0.81, 0.78, 0.85, 0.9), "0.810 [0.780, 0.850] (90% CI)"),
        (Estimate(0.81, 0.78, 0.85, 0.975), "0.810 [0.780, 0.850] (97.5% CI)"),
        (Estimate(0.12, NAN, NAN, 0.95), "0.120 (no CI)"),
        (Estimate(NAN, NAN, NAN, 0.95), "n/a"),
    ],
)
def test_the_text_names_the_estimates_own_level(estimate: Estimate, text: str) -> None:
    assert str(estimate) == estimate.text() == text


def test_text_options() -> None:
    estimate = Estimate(0.8123, 0.7801, 0.8544, 0.9)
    assert estimate.text(2) == "0.81 [0.78, 0.85] (90% CI)"
    assert estimate.text(show_level=False) == "0.812 [0.780, 0.854]"
    assert level_text(0.95) == "95%"


def test_is_finite() -> None:
    assert Estimate(0.8, 0.7, 0.9, 0.95).is_finite
    assert not Estimate(0.8, NAN, 0.9, 0.95).is_finite
