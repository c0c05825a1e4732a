"""Out-of-fold evaluation: metrics with patient-cluster bootstrap CIs, threshold, subgroups, figures.

Public API (numpy/pandas/sklearn only; matplotlib loads only for figures):

* ``evaluate_predictions(oof, config, out_dir=None, *, name="") -> EvaluationReport``
* ``Estimate``: a value with its CI (value, lo, hi, level); ``to_dict``/``from_dict``, ``text``
* ``EvaluationReport`` (``metric``, ``flat_metrics``, ``incomplete_metrics``, ``to_dict``/``from_dict``,
  ``to_markdown``, ``save``/``load``), ``REQUIRED_METRICS``
* ``paired_auc_difference(oof_a, oof_b, config)``, ``leaderboard(reports, oofs, config)``,
  ``split_by_backbone(oof)``
* ``subgroup_table(oof, config)``, ``threshold_for_sensitivity(y, p, target)``
* ``plot_all(oof, report, out_dir)`` (imported lazily: it loads matplotlib)
"""

from __future__ import annotations

from typing import Any

from melanoma_ml.evaluation.compare import leaderboard, paired_auc_difference, split_by_backbone
from melanoma_ml.evaluation.estimate import Estimate
from melanoma_ml.evaluation.inputs import BACKBONE, PROB, validate_predictions
from melanoma_ml.evaluation.report import (
    REQUIRED_METRICS,
    EvaluationReport,
    ThresholdEstimate,
    evaluate_predictions,
)
from melanoma_ml.evaluation.subgroups import subgroup_table
from melanoma_ml.evaluation.threshold import threshold_for_sensitivity

__all__ = [
    "BACKBONE",
    "PROB",
    "REQUIRED_METRICS",
    "Estimate",
    "EvaluationReport",
    "ThresholdEstimate",
    "evaluate_predictions",
    "leaderboard",
    "paired_auc_difference",
    "plot_all",
    "split_by_backbone",
    "subgroup_table",
    "threshold_for_sensitivity",
    "validate_predictions",
]


def __getattr__(name: str) -> Any:
    if name == "plot_all":
        from melanoma_ml.evaluation.plots import plot_all

        return plot_all
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
