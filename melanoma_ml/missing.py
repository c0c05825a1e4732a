"""The one rule for "not recorded": which metadata values count as missing.

Cleaning raw tables, fitting and applying the metadata encoder, building a request from a cleaned row and
validating what a user typed into the app all ask this module, so a value is missing in serving exactly
when it was missing in training.

A value is missing when it is None, NaN (any float or numpy NaN), ``pd.NA`` or ``NaT``, or when its text,
stripped and lower-cased, is one of ``MISSING_TOKENS`` (blank, "unknown", "nan", "n/a", ...). Any other
value is recorded, and its key is that stripped, lower-cased text.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

MISSING_TOKENS: frozenset[str] = frozenset(
    {"", "unknown", "unk", "nan", "none", "null", "na", "n/a", "missing", "not provided", "?", "-"}
)
"""Texts (stripped, lower-cased) that mean "not recorded"."""


def text_key(value: Any) -> str | None:
    """The stripped, lower-cased text of ``value``, or None when it counts as missing.

    This is the comparison key of a category (``" Male "`` and ``"male"`` are the same sex) and the one
    place that decides missingness.
    """
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return None
    key = str(value).strip().lower()
    return None if key in MISSING_TOKENS else key


def is_missing(value: Any) -> bool:
    """True when ``value`` is not recorded (see the module docstring for the rule)."""
    return text_key(value) is None


def text_keys(values: pd.Series) -> pd.Series:
    """``text_key`` of every value (NaN where missing), as an object Series aligned with ``values``.

    The rule runs once per distinct value, so whole columns of a large table stay fast.
    """
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    keys = np.array([text_key(u) for u in uniques] + [np.nan], dtype=object)
    keys[[i for i, k in enumerate(keys) if k is None]] = np.nan
    return pd.Series(keys[codes], index=values.index, dtype=object)
