"""The tabular baseline as a pipeline result: the GBDT trained on the folds table, evaluated, or "off".

``run_tabular_baseline`` trains ``gbdt.train_gbdt_folds`` on the image models' folds, writes its out-of-fold
table and an ``evaluate_predictions`` report (the image models' metrics and patient-bootstrap CIs) under
``reports/gbdt_tabular/``, and returns a ``TabularBaseline``. With ``model.tabular_features`` empty it trains
nothing and returns an off result whose ``note`` says how to turn it on: the step and its Dagster asset
always exist, so the run order and the asset graph do not depend on a setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd

from melanoma_ml.artifacts import artifact_paths
from melanoma_ml.atomic import atomic_write_bytes, parquet_bytes
from melanoma_ml.config import PipelineConfig
from melanoma_ml.tabular.gbdt import GBDT_NAME, train_gbdt_folds

if TYPE_CHECKING:
    from melanoma_ml.evaluation.report import EvaluationReport

OFF_NOTE = (
    "off: model.tabular_features is empty, so there is no tabular baseline and no blend; set "
    "model.tabular_features (e.g. isic2024_tbp, with a dataset that has those columns such as the isic2024 "
    "layout) to train it"
)


@dataclass(frozen=True)
class TabularBaseline:
    """The GBDT baseline's out-of-fold evaluation, or why there is none.

    Attributes:
        report: Out-of-fold ``EvaluationReport`` named ``GBDT_NAME``; None when off.
        features: The model's input columns, in order (empty when off).
        fit_seconds: Fit wall time per validation fold.
        note: One line for the reader: what was trained on what, or ``OFF_NOTE``.
    """

    report: EvaluationReport | None
    features: tuple[str, ...] = ()
    fit_seconds: dict[int, float] = field(default_factory=dict)
    note: str = OFF_NOTE

    @property
    def enabled(self) -> bool:
        return self.report is not None


def run_tabular_baseline(config: PipelineConfig, folds_table: pd.DataFrame) -> TabularBaseline:
    """Train and evaluate the GBDT on every validation fold of ``folds_table`` (or return the off result).

    Writes ``reports/gbdt_tabular/oof.parquet`` (read back by ``ranking.report_oof``) and the report with
    its figures in the same folder. Rows of the locked test split and external rows are never validation
    rows (``training.train.split_fold``), exactly as for the image models, so the OOF tables line up.

    Raises:
        InputValueError: a tabular column the folds table lacks, or a fold that cannot be trained.
    """
    if not config.model.tabular_features:
        return TabularBaseline(report=None)
    from melanoma_ml.evaluation import evaluate_predictions

    result = train_gbdt_folds(config, folds_table)
    paths = artifact_paths(config)
    atomic_write_bytes(paths.oof(GBDT_NAME), parquet_bytes(result.oof))
    report = evaluate_predictions(
        result.oof, config.evaluation, out_dir=paths.report(GBDT_NAME), name=GBDT_NAME
    )
    note = (
        f"HistGradientBoosting on {len(result.features)} tabular columns (no pixels), "
        f"{len(result.fit_seconds)} folds, {len(result.oof)} out-of-fold images; tabular-only, never served"
    )
    return TabularBaseline(report, result.features, result.fit_seconds, note)
