"""The one rule for ages, shared by metadata cleaning and the app.

ISIC publishes ``age_approx`` rounded to 5 years, writes 0 for "unknown" and caps ages at 85
(``schema.MAX_AGE``). So a 0 or a negative age is missing and an older age counts as 85: cleaning does this
to whole columns (``normalize_ages``) and the app to one typed-in age (``normalize_age``), so the model is
never given an age encoding it did not see in training.
"""

from __future__ import annotations

import math

import numpy as np

from melanoma_ml import schema

ZERO_NOTE = "age 0 (used by ISIC for unknown) set missing"
NEGATIVE_NOTE = "negative age set missing"
CAPPED_NOTE = f"age above {schema.MAX_AGE} capped at {schema.MAX_AGE}"


def normalize_ages(ages: np.ndarray) -> tuple[np.ndarray, list[tuple[np.ndarray, str]]]:
    """Apply the age rule to an array of ages (NaN = missing).

    Args:
        ages: Numbers in years, any shape; NaN and infinities count as missing (callers that parse text
            report those themselves).

    Returns:
        The normalized float64 array (NaN = missing) and one ``(mask, note)`` per fix, masks aligned with
        ``ages``: 0 -> missing, negative -> missing, above ``schema.MAX_AGE`` -> ``schema.MAX_AGE``.
    """
    values = np.asarray(ages, dtype="float64")
    finite = np.isfinite(values)
    zero = finite & (values == 0)
    negative = finite & (values < 0)
    capped = finite & (values > schema.MAX_AGE)
    out = np.where(finite & ~zero & ~negative, np.minimum(values, float(schema.MAX_AGE)), np.nan)
    return out, [(zero, ZERO_NOTE), (negative, NEGATIVE_NOTE), (capped, CAPPED_NOTE)]


def normalize_age(value: float) -> tuple[float | None, str | None]:
    """Apply the age rule to one age: ``(age in years or None for unknown, note on what changed or None)``."""
    out, fixes = normalize_ages(np.array([value], dtype="float64"))
    age = float(out[0])
    note = next((note for mask, note in fixes if mask[0]), None)
    return (None if math.isnan(age) else age), note
