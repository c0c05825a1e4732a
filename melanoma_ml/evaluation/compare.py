"""Paired comparison of models evaluated on the same images, and the backbone leaderboard."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from melanoma_ml import schema
from melanoma_ml.config import EvaluationConfig
from melanoma_ml.errors import InputValueError
from melanoma_ml.evaluation import weighted
from melanoma_ml.evaluation.bootstrap import batch_size, percentile_interval
from melanoma_ml.evaluation.inputs import BACKBONE, PROB, describe_rows, group_codes, validate_predictions
from melanoma_ml.evaluation.metrics import roc_auc
from melanoma_ml.evaluation.resample import draw_group_resamples

if TYPE_CHECKING:
    from melanoma_ml.evaluation.report import EvaluationReport

_NAMES_SHOWN = 5


def _names(values: pd.Index | np.ndarray) -> str:
    values = list(values)
    text = ", ".join(map(str, values[:_NAMES_SHOWN]))
    return text + (f" and {len(values) - _NAMES_SHOWN} more" if len(values) > _NAMES_SHOWN else "")


def align_predictions(
    oof_a: pd.DataFrame, oof_b: pd.DataFrame, names: tuple[str, str] = ("a", "b")
) -> pd.DataFrame:
    """Both models' predictions side by side (``prob_a``, ``prob_b``), rows matched by image name.

    Raises:
        ValueError: the tables do not cover the same images, or disagree on an image's target or group.
    """
    a = validate_predictions(oof_a, what=f"predictions of {names[0]}")
    b = validate_predictions(oof_b, what=f"predictions of {names[1]}")
    only_a = pd.Index(a[schema.IMAGE]).difference(pd.Index(b[schema.IMAGE]))
    only_b = pd.Index(b[schema.IMAGE]).difference(pd.Index(a[schema.IMAGE]))
    if len(only_a) or len(only_b):
        raise InputValueError(
            f"a paired comparison needs both models' predictions for the same images: "
            f"{len(only_a)} image(s) only in {names[0]} ({_names(only_a)}), {len(only_b)} only in "
            f"{names[1]} ({_names(only_b)}); evaluate both on the same folds table"
        )
    keep = [schema.IMAGE, schema.GROUP, schema.TARGET, PROB]
    merged = a[keep].merge(b[keep], on=schema.IMAGE, suffixes=("_a", "_b"), validate="one_to_one")
    for column in (schema.TARGET, schema.GROUP):
        differs = (merged[f"{column}_a"] != merged[f"{column}_b"]).to_numpy()
        if differs.any():
            raise InputValueError(
                f"{names[0]} and {names[1]} disagree on {column} for {describe_rows(merged, differs)}; "
                f"both must come from the same folds table"
            )
    return merged.rename(
        columns={f"{schema.TARGET}_a": schema.TARGET, f"{schema.GROUP}_a": schema.GROUP}
    ).drop(columns=[f"{schema.TARGET}_b", f"{schema.GROUP}_b"])


def paired_auc_difference(
    oof_a: pd.DataFrame,
    oof_b: pd.DataFrame,
    config: EvaluationConfig,
    *,
    names: tuple[str, str] = ("a", "b"),
) -> dict[str, Any]:
    """AUC of model a minus AUC of model b, with a paired cluster-bootstrap CI.

    The same group resamples are applied to both models, so the CI reflects the difference on the same
    patients rather than two independent uncertainties. Positive means a is better.

    Returns:
        ``diff``, ``lo``, ``hi`` (percentile CI at ``config.ci_level``), ``p_value`` (two-sided bootstrap
        p: twice the smaller share of resamples on either side of 0, capped at 1), ``share_not_better``
        (share of resamples where a's AUC <= b's), ``auc_a``, ``auc_b``, ``n`` (images), ``n_groups``,
        ``n_bootstrap``, ``n_redrawn``, ``ci_level``.
    """
    merged = align_predictions(oof_a, oof_b, names)
    y = merged[schema.TARGET].to_numpy()
    codes, n_groups = group_codes(merged)
    auc_a = roc_auc(y, merged[f"{PROB}_a"].to_numpy())
    auc_b = roc_auc(y, merged[f"{PROB}_b"].to_numpy())
    resamples = draw_group_resamples(y, codes, config.n_bootstrap, config.bootstrap_seed)
    rows_a = weighted.WeightedRows(y, merged[f"{PROB}_a"].to_numpy(), codes, n_groups)
    rows_b = weighted.WeightedRows(y, merged[f"{PROB}_b"].to_numpy(), codes, n_groups)
    diffs = np.concatenate(
        [
            weighted.auc(*rows_a.class_weights(resamples.counts[batch]))
            - weighted.auc(*rows_b.class_weights(resamples.counts[batch]))
            for batch in resamples.batches(batch_size(rows_a, rows_b))
        ]
    )
    lo, hi = percentile_interval(diffs, config.ci_level)
    not_better = float(np.mean(diffs <= 0))
    not_worse = float(np.mean(diffs >= 0))
    return {
        "diff": auc_a - auc_b,
        "lo": lo,
        "hi": hi,
        "p_value": min(1.0, 2 * min(not_better, not_worse)),
        "share_not_better": not_better,
        "auc_a": auc_a,
        "auc_b": auc_b,
        "n": len(merged),
        "n_groups": n_groups,
        "n_bootstrap": resamples.n_resamples,
        "n_redrawn": resamples.n_redrawn,
        "ci_level": config.ci_level,
    }


LEADERBOARD_COLUMNS: tuple[str, ...] = (
    "rank",
    "backbone",
    "auc",
    "auc_lo",
    "auc_hi",
    "pauc",
    "pauc_lo",
    "pauc_hi",
    "auc_diff_vs_best",
    "diff_lo",
    "diff_hi",
    "p_value",
    "candidate",
)


def leaderboard(
    reports: Mapping[str, EvaluationReport],
    oofs: Mapping[str, pd.DataFrame],
    config: EvaluationConfig,
) -> pd.DataFrame:
    """Backbones ranked by out-of-fold AUC, each with its paired AUC difference to the best.

    Ties on AUC are broken by partial AUC, then by name. The best backbone is the candidate for promotion:
    its row has ``candidate=True``, a difference of 0, and the frame's ``attrs["candidate"]`` names it.
    ``auc_diff_vs_best`` is this backbone's AUC minus the best's (<= 0); a CI that contains 0 means the
    data cannot tell the two apart.

    Raises:
        ValueError: no reports, or ``reports`` and ``oofs`` name different backbones.
    """
    if not reports:
        raise InputValueError("leaderboard needs at least one evaluated backbone")
    if set(reports) != set(oofs):
        raise ValueError(
            f"reports and predictions must name the same backbones: reports {sorted(reports)}, "
            f"predictions {sorted(oofs)}"
        )
    ranked = sorted(
        reports, key=lambda n: (-reports[n].metric("auc").value, -reports[n].metric("pauc").value, n)
    )
    best = ranked[0]
    records = []
    for rank, name in enumerate(ranked, start=1):
        if name == best:
            diff = {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p_value": float("nan")}
        else:
            diff = paired_auc_difference(oofs[name], oofs[best], config, names=(name, best))
        records.append(
            {"rank": rank, **leaderboard_row(name, reports[name], diff), "candidate": name == best}
        )
    table = pd.DataFrame.from_records(records, columns=list(LEADERBOARD_COLUMNS))
    table.attrs["candidate"] = best
    return table


def split_by_backbone(oof: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Split a multi-model predictions table on its ``backbone`` column (the input of :func:`leaderboard`).

    Raises:
        ValueError: the table has no ``backbone`` column or a row without one.
    """
    if BACKBONE not in oof.columns:
        raise InputValueError(
            f"predictions have no {BACKBONE!r} column to split on; add it or pass one table per model"
        )
    missing = oof[BACKBONE].isna().to_numpy()
    if missing.any():
        raise InputValueError(
            f"{BACKBONE} is missing in {describe_rows(oof.reset_index(drop=True), missing)}"
        )
    return {str(name): part.reset_index(drop=True) for name, part in oof.groupby(BACKBONE, sort=True)}


def leaderboard_row(name: str, report: EvaluationReport, diff: Mapping[str, Any]) -> dict[str, Any]:
    """One leaderboard row: ``name``'s AUC and pAUC with their CIs, and its paired AUC difference ``diff``
    (``paired_auc_difference``'s dict) against the best model."""
    auc, pauc = report.metric("auc"), report.metric("pauc")
    return {
        "backbone": name,
        "auc": auc.value,
        "auc_lo": auc.lo,
        "auc_hi": auc.hi,
        "pauc": pauc.value,
        "pauc_lo": pauc.lo,
        "pauc_hi": pauc.hi,
        "auc_diff_vs_best": diff["diff"],
        "diff_lo": diff["lo"],
        "diff_hi": diff["hi"],
        "p_value": diff["p_value"],
    }
