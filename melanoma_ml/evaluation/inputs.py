"""Validation of an out-of-fold predictions table before any metric is computed.

Every evaluation entry point calls :func:`validate_predictions` first, so a bad table fails once, early,
with a message that names the rows and the fix, instead of a deep traceback from numpy or sklearn.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from melanoma_ml import schema
from melanoma_ml.errors import InputValueError

PROB = "prob"
"""Column with the predicted melanoma probability in [0, 1] (written by training as ``oof.parquet``)."""

BACKBONE = "backbone"
"""Optional column naming the model that produced a row (multi-model comparison)."""

REQUIRED_COLUMNS: tuple[str, ...] = (schema.IMAGE, schema.GROUP, schema.TARGET, PROB)

_ROWS_SHOWN = 5


def describe_rows(frame: pd.DataFrame, mask: np.ndarray | pd.Series, limit: int = _ROWS_SHOWN) -> str:
    """``"row 3 (ISIC_1), row 9 (ISIC_2) and 4 more"`` for the rows where ``mask`` is true.

    Rows are numbered by position in ``frame`` (0-based), as in ``pandas.read_parquet(...).iloc[row]``.
    """
    positions = np.flatnonzero(np.asarray(mask, dtype=bool))
    names = frame[schema.IMAGE].to_numpy() if schema.IMAGE in frame.columns else None
    shown = [f"row {i} ({names[i]})" if names is not None else f"row {i}" for i in positions[:limit]]
    text = ", ".join(shown)
    if len(positions) > limit:
        text += f" and {len(positions) - limit} more"
    return text


def validate_predictions(oof: pd.DataFrame, *, what: str = "out-of-fold predictions") -> pd.DataFrame:
    """Check an out-of-fold predictions table and return a clean copy.

    The copy has a fresh ``RangeIndex``, ``target`` as int8 (0/1) and ``prob`` as float64; other columns
    (fold, sex, age, site, backbone) are kept as they are.

    Args:
        oof: one row per image with ``image_name``, ``group_id``, ``target``, ``prob`` (and optional
            ``fold``, ``sex``, ``age_approx``, ``anatom_site_general_challenge``, ``backbone``).
        what: how error messages name the table (e.g. ``"predictions of resnet50"``).

    Raises:
        ValueError: empty table, missing columns, duplicate image names, missing group ids, targets other
            than 0/1, or probabilities that are NaN or outside [0, 1]; the message names the rows.
    """
    if not isinstance(oof, pd.DataFrame):
        raise TypeError(f"{what} must be a pandas DataFrame, got {type(oof).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in oof.columns]
    if missing:
        raise InputValueError(
            f"{what} lack column(s) {missing}; expected {list(REQUIRED_COLUMNS)} (the oof.parquet that "
            f"training writes per fold, concatenated; group_id comes from folds.assign_folds)"
        )
    if len(oof) == 0:
        raise InputValueError(f"{what} are empty (0 rows); train at least one fold before evaluating")
    frame = oof.reset_index(drop=True).copy()

    duplicated = frame[schema.IMAGE].duplicated(keep=False).to_numpy()
    if duplicated.any() and BACKBONE in frame.columns and frame[BACKBONE].nunique() > 1:
        raise InputValueError(
            f"{what} hold several backbones ({sorted(map(str, frame[BACKBONE].dropna().unique()))}); "
            f"evaluate each on its own (evaluation.split_by_backbone) and compare them with leaderboard()"
        )
    if duplicated.any():
        raise InputValueError(
            f"{what} list the same image more than once: {describe_rows(frame, duplicated)}; each image "
            f"must have exactly one out-of-fold prediction (did two folds' oof.parquet overlap?)"
        )
    no_group = frame[schema.GROUP].isna().to_numpy()
    if no_group.any():
        raise InputValueError(
            f"{what} have no {schema.GROUP} in {describe_rows(frame, no_group)}; build the table from "
            f"folds.parquet (assign_folds sets group_id = patient, else lesion, else image)"
        )

    target = pd.to_numeric(frame[schema.TARGET], errors="coerce")
    bad_target = ~target.isin([0, 1]).to_numpy()
    if bad_target.any():
        raise InputValueError(
            f"{what} have {schema.TARGET} other than 0/1 in {describe_rows(frame, bad_target)}; "
            f"target must be 1 for melanoma and 0 for benign"
        )
    frame[schema.TARGET] = target.astype(np.int8)

    prob = pd.to_numeric(frame[PROB], errors="coerce").astype(np.float64)
    nan_prob = prob.isna().to_numpy()
    if nan_prob.any():
        raise InputValueError(
            f"{what} have a missing or non-numeric {PROB} in {describe_rows(frame, nan_prob)}; "
            f"the model produced NaN (diverged training?) or the rows were never predicted; re-run that fold"
        )
    outside = ((prob < 0) | (prob > 1)).to_numpy()
    if outside.any():
        raise InputValueError(
            f"{what} have {PROB} outside [0, 1] in {describe_rows(frame, outside)}; these look like logits, "
            f"apply a sigmoid before evaluating"
        )
    frame[PROB] = prob
    return frame


def labels_and_scores(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``(y, p)`` arrays of a validated frame."""
    return frame[schema.TARGET].to_numpy(dtype=np.int8), frame[PROB].to_numpy(dtype=np.float64)


def group_codes(frame: pd.DataFrame) -> tuple[np.ndarray, int]:
    """Integer code per row of its ``group_id`` (0..n_groups-1) and the number of groups.

    Codes follow the sorted group ids (as text), so the resamples, and every CI, do not depend on row order.
    """
    codes, uniques = pd.factorize(frame[schema.GROUP].astype(str), sort=True)
    return codes.astype(np.int64), len(uniques)
