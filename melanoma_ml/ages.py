"""The one rule for ages, shared by metadata cleaning and the app.

ISIC publishes ``age_approx`` rounded to 5 years, writes 0 for "unknown" and caps ages at 85
(``schema.MAX_AGE``: 85 means 85 or older). So a 0 is missing and an older age counts as 85. A number
outside ``schema.MIN_VALID_AGE``-``schema.MAX_VALID_AGE`` (0-120) is not an age at all: it is missing (the
app refuses it before this rule runs; cleaning warns, or quarantines the row with
``data.age_out_of_range: quarantine``). Cleaning applies the rule to whole columns (``normalize_ages``) and
the app to one typed-in age (``normalize_age``), so the model is never given an age encoding it did not see
in training.
"""

from __future__ import annotations

import math

import numpy as np

from melanoma_ml import schema
from melanoma_ml.missing import is_missing

ZERO_NOTE = "age 0 (used by ISIC for unknown) set missing"
OUT_OF_RANGE_NOTE = f"age outside {schema.MIN_VALID_AGE}-{schema.MAX_VALID_AGE} years set missing"
CAPPED_NOTE = f"age above {schema.MAX_AGE} capped at {schema.MAX_AGE}"


def normalize_ages(ages: np.ndarray) -> tuple[np.ndarray, list[tuple[np.ndarray, str]]]:
    """Apply the age rule to an array of ages (NaN = missing).

    Args:
        ages: Numbers in years, any shape; NaN and infinities count as missing (callers that parse text
            report those themselves).

    Returns:
        The normalized float64 array (NaN = missing) and one ``(mask, note)`` per fix, masks aligned with
        ``ages``: 0 -> missing, outside 0-120 (``out_of_range``) -> missing, above ``schema.MAX_AGE`` ->
        ``schema.MAX_AGE``.
    """
    values = np.asarray(ages, dtype="float64")
    finite = np.isfinite(values)
    zero = finite & (values == 0)
    invalid = out_of_range(values)
    capped = finite & ~invalid & (values > schema.MAX_AGE)
    out = np.where(finite & ~zero & ~invalid, np.minimum(values, float(schema.MAX_AGE)), np.nan)
    return out, [(zero, ZERO_NOTE), (invalid, OUT_OF_RANGE_NOTE), (capped, CAPPED_NOTE)]


def out_of_range(ages: np.ndarray) -> np.ndarray:
    """Which finite ages lie outside ``schema.MIN_VALID_AGE``-``schema.MAX_VALID_AGE`` (not a person's age)."""
    values = np.asarray(ages, dtype="float64")
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & ((values < schema.MIN_VALID_AGE) | (values > schema.MAX_VALID_AGE))


def normalize_age(value: float | None) -> tuple[float | None, str | None]:
    """Apply the age rule to one age: ``(age in years or None for unknown, note on what changed or None)``.

    A value ``melanoma_ml.missing`` calls missing (None, NaN, "", "unknown", ...) is unknown, with no note.
    """
    if is_missing(value):
        return None, None
    out, fixes = normalize_ages(np.array([value], dtype="float64"))
    age = float(out[0])
    note = next((note for mask, note in fixes if mask[0]), None)
    return (None if math.isnan(age) else age), note
