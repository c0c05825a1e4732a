"""Patient-cluster bootstrap: the distribution of every metric over group resamples, and percentile CIs.

Design choices (documented in the report too):

* Groups (patient, else lesion, else image) are resampled with replacement, so images of one patient
  move together and the CI reflects between-patient variation.
* Threshold metrics are measured at the FIXED thresholds tuned on the full out-of-fold set (the operating
  point that ships). The tuned threshold itself is re-tuned in every resample, which gives its own CI.
  The fixed-threshold sensitivity CI is therefore slightly optimistic (the threshold saw these data).
* A resample that holds a single class is redrawn when drawn (see ``resample.py``); inside a subgroup
  such resamples score NaN and are left out of that subgroup's percentiles.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from melanoma_ml.config import EvaluationConfig
from melanoma_ml.evaluation import weighted
from melanoma_ml.evaluation.metrics import THRESHOLD_METRICS
from melanoma_ml.evaluation.resample import GroupResamples

_BATCH_CELLS = 2_000_000
"""Score cells (or groups) times resamples held in memory at once: about 16 MB per float64 array."""


def batch_size(*rows: weighted.WeightedRows) -> int:
    """Resamples per batch so that neither the cell weights nor the float group counts grow too large."""
    widest = max(max(r.n_scores, r.n_groups) for r in rows)
    return max(1, _BATCH_CELLS // max(widest, 1))


def metric_key(metric: str, operating_point: str) -> str:
    """Column name of a threshold metric at a named operating point, e.g. ``sensitivity@tuned``."""
    return f"{metric}@{operating_point}"


@dataclass(frozen=True)
class BootstrapDraws:
    """Metric values per resample.

    Attributes:
        values: one row per resample, one column per metric (``auc``, ``pauc``, ``brier``, ``ece``,
            ``threshold`` and ``<metric>@<operating point>``).
        roc_tpr: TPR of each resample's ROC at ``fpr_grid``, shape ``(len(fpr_grid), n_resamples)``.
        fpr_grid: the false-positive rates of ``roc_tpr``.
    """

    values: pd.DataFrame
    roc_tpr: np.ndarray
    fpr_grid: np.ndarray


def bootstrap_overall(
    rows: weighted.WeightedRows,
    resamples: GroupResamples,
    *,
    operating_points: Mapping[str, float],
    config: EvaluationConfig,
    fpr_grid: np.ndarray,
) -> BootstrapDraws:
    """Every reported metric for every resample of ``rows``.

    Args:
        rows: all evaluated rows.
        resamples: group resamples drawn for these rows' groups.
        operating_points: fixed thresholds by name (``{"tuned": 0.31, "fixed": 0.5}``).
        config: target sensitivity, partial-AUC TPR floor and calibration bins.
        fpr_grid: false-positive rates at which each resample's ROC is sampled (the ROC CI band).
    """
    parts: list[pd.DataFrame] = []
    tprs: list[np.ndarray] = []
    for batch in resamples.batches(batch_size(rows)):
        counts = resamples.counts[batch].astype(np.float64)
        P, N = rows.class_weights(counts)
        columns: dict[str, np.ndarray] = {
            "auc": weighted.auc(P, N),
            "pauc": weighted.partial_auc(P, N, config.pauc_min_tpr),
            "brier": rows.brier(counts),
            "ece": rows.calibration_error(counts, config.ece_bins),
            "threshold": weighted.threshold_for_sensitivity(P, rows.scores, config.target_sensitivity),
        }
        for point, threshold in operating_points.items():
            rates = rows.threshold_rates(counts, threshold)
            columns.update({metric_key(m, point): rates[m] for m in THRESHOLD_METRICS})
        parts.append(pd.DataFrame(columns))
        tprs.append(weighted.roc_tpr_at(P, N, fpr_grid))
    return BootstrapDraws(
        values=pd.concat(parts, ignore_index=True), roc_tpr=np.hstack(tprs), fpr_grid=fpr_grid
    )


def bootstrap_subset(
    rows: weighted.WeightedRows, resamples: GroupResamples, threshold: float
) -> pd.DataFrame:
    """AUC, sensitivity and specificity (at ``threshold``) of a subset of rows for every resample."""
    parts = []
    for batch in resamples.batches(batch_size(rows)):
        counts = resamples.counts[batch].astype(np.float64)
        P, N = rows.class_weights(counts)
        rates = rows.threshold_rates(counts, threshold)
        parts.append(
            pd.DataFrame(
                {
                    "auc": weighted.auc(P, N),
                    "sensitivity": rates["sensitivity"],
                    "specificity": rates["specificity"],
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def percentile_interval(values: np.ndarray | pd.Series, level: float) -> tuple[float, float]:
    """Percentile bootstrap interval at ``level`` over the finite values; ``(nan, nan)`` if there are none."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)
