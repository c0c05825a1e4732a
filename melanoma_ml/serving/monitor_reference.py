"""The serving monitor's reference a bundle ships (manifest ``monitor_reference``): the metadata mix.

The scores need nothing new: the manifest already stores the served model's out-of-fold rows (``oof``:
target and raw probability) and its calibrator, from which ``monitoring.reference.reference_scores``
derives the served probabilities exactly as serving does; storing them a second time would be a second
copy of one fact. The OOD reference is the detector's own (``manifest.ood``: a share ``1 - quantile`` of
in-distribution images is flagged). What the manifest lacks is the metadata mix of those rows:
:class:`MonitorReference` holds the shares of each sex, anatomic site and age band (a missing value is its
own category; keys as ``missing.text_key`` writes them) and age quantiles.

It lives here, beside the manifest that stores it, because the manifest is the lowest layer of ``serving``
and ``melanoma_ml.monitoring`` sits above ``serving`` (pyproject ``[tool.importlinter]``).
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from melanoma_ml import schema
from melanoma_ml.errors import InputValueError
from melanoma_ml.missing import text_keys

MISSING = "missing"
"""Category of a value that was not recorded."""

AGE_BANDS: tuple[tuple[str, float], ...] = (
    ("<30", 30),
    ("30-44", 45),
    ("45-59", 60),
    ("60-74", 75),
    ("75+", np.inf),
)
"""Age bands (label, upper bound exclusive) the age mix is compared in: fixed, so a day's mix and the
reference's always share bins whatever the ages' ties (ISIC rounds ages to 5 years)."""

AGE_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)

METADATA_FIELDS = ("sex", "site", "age_band")
"""The mixes compared: field -> category shares."""

Share = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class MonitorReference(BaseModel):
    """The metadata mix of the rows the bundle's ``oof`` describes (module docstring).

    Attributes:
        format_version: 1.
        rows: Which rows (e.g. "the served model's 412 out-of-fold rows").
        n_rows: How many.
        mix: Field (:data:`METADATA_FIELDS`) -> category -> share of :attr:`n_rows` (each sums to 1).
        age_quantiles: ``"q10"`` ... ``"q90"`` of the recorded ages (empty when none was recorded).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: Literal[1] = 1
    rows: str
    n_rows: int = Field(ge=1)
    mix: dict[str, dict[str, Share]]
    age_quantiles: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _shares_sum_to_one(self) -> MonitorReference:
        for name, shares in self.mix.items():
            if abs(sum(shares.values()) - 1.0) > 1e-6:
                raise ValueError(f"mix {name!r} shares sum to {sum(shares.values()):.6f}, not 1")
        return self


def metadata_categories(age: pd.Series, sex: pd.Series, site: pd.Series) -> dict[str, pd.Series]:
    """Each case's category per :data:`METADATA_FIELDS` (missing values :data:`MISSING`)."""
    ages = pd.to_numeric(age, errors="coerce")
    bands = pd.Series(MISSING, index=ages.index, dtype=object)
    lower = -np.inf
    for label, upper in AGE_BANDS:
        bands[(ages >= lower) & (ages < upper)] = label
        lower = upper
    return {
        "sex": text_keys(sex).fillna(MISSING),
        "site": text_keys(site).fillna(MISSING),
        "age_band": bands,
    }


def build_monitor_reference(rows: pd.DataFrame, *, description: str) -> MonitorReference:
    """The reference mix of ``rows`` (columns ``schema.AGE``, ``schema.SEX``, ``schema.SITE``: a cleaned table).

    Raises:
        InputValueError: no rows, or a metadata column is absent (names it).
    """
    absent = [c for c in (schema.AGE, schema.SEX, schema.SITE) if c not in rows.columns]
    if absent:
        raise InputValueError(f"the reference rows lack {absent}; pass rows of the cleaned metadata table")
    if rows.empty:
        raise InputValueError("no reference rows: the served model's out-of-fold rows are not in the table")
    categories = metadata_categories(rows[schema.AGE], rows[schema.SEX], rows[schema.SITE])
    mix = {
        name: {str(c): float(s) for c, s in values.value_counts(normalize=True).items()}
        for name, values in categories.items()
    }
    ages = pd.to_numeric(rows[schema.AGE], errors="coerce").dropna()
    quantiles = {f"q{round(q * 100)}": float(ages.quantile(q)) for q in AGE_QUANTILES} if len(ages) else {}
    return MonitorReference(rows=description, n_rows=len(rows), mix=mix, age_quantiles=quantiles)


def reference_for_bundle(oof: pd.DataFrame, table: pd.DataFrame | None) -> MonitorReference | None:
    """The reference of a bundle whose served out-of-fold rows are ``oof``: their metadata in ``table``.

    None without a table (a bundle registered without the folds table ships no reference).
    """
    if table is None:
        return None
    rows = table[table[schema.IMAGE].isin(oof[schema.IMAGE])]
    return build_monitor_reference(rows, description=f"the served model's {len(rows)} out-of-fold rows")
