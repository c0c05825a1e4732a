"""The one age rule shared by metadata cleaning (columns) and the app (one typed-in age)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from melanoma_ml import schema
from melanoma_ml.ages import CAPPED_NOTE, OUT_OF_RANGE_NOTE, ZERO_NOTE, normalize_age, normalize_ages


@pytest.mark.parametrize(
    ("value", "expected", "note"),
    [(0, None, ZERO_NOTE), (-5, None, OUT_OF_RANGE_NOTE), (200, None, OUT_OF_RANGE_NOTE), (120.5, None, OUT_OF_RANGE_NOTE), (0.5, 0.5, None), (45, 45.0, None),
     (schema.MAX_AGE, float(schema.MAX_AGE), None), (86, float(schema.MAX_AGE), CAPPED_NOTE),
     (120, float(schema.MAX_AGE), CAPPED_NOTE), (math.nan, None, None)],
)  # fmt: skip
def test_normalize_age(value, expected, note):
    assert normalize_age(value) == (expected, note)


def test_scalar_and_column_rules_agree():
    values = np.array([np.nan, -1.0, 0.0, 0.5, 5.0, 84.9, 85.0, 85.1, 90.0, 120.0, 130.0, np.inf])
    column, fixes = normalize_ages(values)
    assert [note for _, note in fixes] == [ZERO_NOTE, OUT_OF_RANGE_NOTE, CAPPED_NOTE]
    for i, value in enumerate(values):
        age, note = normalize_age(value)
        assert (math.isnan(column[i]) and age is None) or column[i] == age, value
        assert note == next((n for mask, n in fixes if mask[i]), None), value
    assert column.dtype == np.float64 and column.shape == values.shape
