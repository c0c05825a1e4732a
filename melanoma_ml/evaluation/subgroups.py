"""Performance per sex, age band and anatomical site, with cluster-bootstrap CIs.

Each subgroup is scored under the same group resamples as the whole set (a resampled patient brings all
of their images in that subgroup), and its sensitivity/specificity are measured at the GLOBAL tuned
threshold: the one the deployed model uses for everyone.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from melanoma_ml import schema
from melanoma_ml.config import EvaluationConfig
from melanoma_ml.errors import InputValueError
from melanoma_ml.evaluation.bootstrap import bootstrap_subset, percentile_interval
from melanoma_ml.evaluation.inputs import describe_rows, group_codes, labels_and_scores, validate_predictions
from melanoma_ml.evaluation.metrics import roc_auc, threshold_metrics
from melanoma_ml.evaluation.resample import GroupResamples, draw_group_resamples
from melanoma_ml.evaluation.threshold import threshold_for_sensitivity
from melanoma_ml.evaluation.weighted import WeightedRows

UNKNOWN = "unknown"
AGE_BANDS: tuple[tuple[str, float, float], ...] = (
    ("<30", -math.inf, 30),
    ("30-44", 30, 45),
    ("45-59", 45, 60),
    ("60-74", 60, 75),
    ("75+", 75, math.inf),
)
"""Reporting bands ``(label, lower inclusive, upper exclusive)`` of ``age_approx``."""

SUBGROUP_VARIABLES: tuple[tuple[str, str], ...] = (
    ("sex", schema.SEX),
    ("age", schema.AGE),
    ("site", schema.SITE),
)
"""``(variable name in the table, source column)``; a variable whose column is absent is left out."""

SUBGROUP_COLUMNS: tuple[str, ...] = (
    "variable",
    "level",
    "n",
    "n_melanoma",
    "auc",
    "auc_lo",
    "auc_hi",
    "sensitivity",
    "sensitivity_lo",
    "sensitivity_hi",
    "specificity",
    "specificity_lo",
    "specificity_hi",
    "note",
)


def _categorical_levels(values: pd.Series, vocabulary: tuple[str, ...]) -> tuple[pd.Series, list[str]]:
    """Level per row (vocabulary, then any other observed value, then ``unknown``) and the level order."""
    labels = values.astype("string").str.strip().str.lower().fillna(UNKNOWN).replace("", UNKNOWN)
    extras = sorted(set(labels) - set(vocabulary) - {UNKNOWN})
    return labels.astype(object), [*vocabulary, *extras, UNKNOWN]


def _age_levels(frame: pd.DataFrame) -> tuple[pd.Series, list[str]]:
    age = pd.to_numeric(frame[schema.AGE], errors="coerce")
    not_numeric = (age.isna() & frame[schema.AGE].notna()).to_numpy()
    if not_numeric.any():
        raise InputValueError(
            f"{schema.AGE} is not a number in {describe_rows(frame, not_numeric)}; clean the metadata "
            f"(metadata.clean_metadata) or leave unknown ages empty"
        )
    labels = pd.Series(UNKNOWN, index=frame.index, dtype=object)
    for label, lower, upper in AGE_BANDS:
        labels[(age >= lower) & (age < upper)] = label
    return labels, [label for label, _, _ in AGE_BANDS] + [UNKNOWN]


def subgroup_levels(frame: pd.DataFrame) -> dict[str, tuple[pd.Series, list[str]]]:
    """For each subgroup variable present in ``frame``: the level of each row and the level order."""
    out: dict[str, tuple[pd.Series, list[str]]] = {}
    for variable, column in SUBGROUP_VARIABLES:
        if column not in frame.columns:
            continue
        if column == schema.AGE:
            out[variable] = _age_levels(frame)
        else:
            vocabulary = schema.SEXES if column == schema.SEX else schema.SITES
            out[variable] = _categorical_levels(frame[column], vocabulary)
    return out


def _row(
    variable: str,
    level: str,
    y: np.ndarray,
    p: np.ndarray,
    codes: np.ndarray,
    resamples: GroupResamples,
    threshold: float,
    config: EvaluationConfig,
) -> dict[str, object]:
    n_mel, n_ben = int((y == 1).sum()), int((y == 0).sum())
    row: dict[str, object] = {"variable": variable, "level": level, "n": len(y), "n_melanoma": n_mel}
    row.update({c: float("nan") for c in SUBGROUP_COLUMNS[4:-1]})
    if len(y) == 0:
        row["note"] = "no images"
        return row
    notes = []
    draws = bootstrap_subset(WeightedRows(y, p, codes, resamples.n_groups), resamples, threshold)
    at_threshold = threshold_metrics(y, p, threshold)
    min_cases = config.subgroup_min_cases
    if n_mel >= min_cases and n_ben >= min_cases:
        row["auc"] = roc_auc(y, p)
        row["auc_lo"], row["auc_hi"] = percentile_interval(draws["auc"], config.ci_level)
        usable = int(np.isfinite(draws["auc"]).sum())
        if usable < resamples.n_resamples:
            notes.append(f"AUC CI from {usable} of {resamples.n_resamples} resamples (others lacked a class)")
    else:
        notes.append(
            f"AUC not reported: {n_mel} melanoma and {n_ben} benign images, fewer than "
            f"subgroup_min_cases={min_cases} of each"
        )
    for metric, present in (("sensitivity", n_mel), ("specificity", n_ben)):
        if present:
            row[metric] = at_threshold[metric]
            row[f"{metric}_lo"], row[f"{metric}_hi"] = percentile_interval(draws[metric], config.ci_level)
    if not n_mel:
        notes.append("no melanoma: sensitivity undefined")
    if not n_ben:
        notes.append("no benign images: specificity undefined")
    row["note"] = "; ".join(notes)
    return row


def subgroup_table(
    oof: pd.DataFrame,
    config: EvaluationConfig,
    *,
    threshold: float | None = None,
    resamples: GroupResamples | None = None,
) -> pd.DataFrame:
    """One row per (variable, level): sex (female/male/unknown), age band, anatomical site.

    Every vocabulary level is listed even when empty (``n=0``), so tables of different runs line up;
    values outside the vocabulary get their own level and missing values are ``unknown`` (no row is
    dropped). AUC is NaN, with a note, when a level has fewer than ``config.subgroup_min_cases``
    melanoma or benign images.

    Args:
        oof: out-of-fold predictions (see ``inputs.validate_predictions``) with optional sex, age and
            site columns; variables whose column is missing are left out.
        config: evaluation settings.
        threshold: the global operating threshold; tuned on ``oof`` at the target sensitivity if None.
        resamples: group resamples of ``oof``'s groups (``evaluate_predictions`` passes its own so the
            subgroup CIs use the same resamples); drawn from ``config`` if None.

    Returns:
        A frame with :data:`SUBGROUP_COLUMNS`.
    """
    frame = validate_predictions(oof)
    y, p = labels_and_scores(frame)
    codes, n_groups = group_codes(frame)
    if threshold is None:
        threshold = threshold_for_sensitivity(y, p, config.target_sensitivity)
    if resamples is None:
        resamples = draw_group_resamples(y, codes, config.n_bootstrap, config.bootstrap_seed)
    elif resamples.n_groups != n_groups:
        raise ValueError(
            f"resamples cover {resamples.n_groups} groups but the predictions have {n_groups}; "
            f"draw them from the same predictions table"
        )
    rows = []
    for variable, (labels, order) in subgroup_levels(frame).items():
        values = labels.to_numpy()
        for level in order:
            mask = values == level
            rows.append(_row(variable, level, y[mask], p[mask], codes[mask], resamples, threshold, config))
    return pd.DataFrame.from_records(rows, columns=list(SUBGROUP_COLUMNS))
