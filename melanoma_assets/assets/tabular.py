"""The tabular baseline asset: a GBDT on the tabular features alone, on the image models' folds.

Always in the graph (so the asset graph does not change with a setting); with ``model.tabular_features``
empty it materializes an "off" result whose metadata says how to turn it on.
"""

import dagster as dg
import pandas as pd

from melanoma_assets.groups import EVALUATION
from melanoma_assets.presentation import figures_md, table_md
from melanoma_assets.resources import PipelineSettings
from melanoma_assets.versions import code_version
from melanoma_ml import pipeline


@dg.asset(
    group_name=EVALUATION,
    ins={"patient_folds": dg.AssetIn("patient_folds")},
    code_version=code_version("tabular_baseline"),
    automation_condition=dg.AutomationCondition.eager(),
    description="Gradient-boosted trees (HistGradientBoosting) on model.tabular_features + age/sex/site, no "
    "pixels, trained per fold on the image models' folds: out-of-fold report with patient-bootstrap CIs in "
    "reports/gbdt_tabular/. A tabular-only leaderboard row (never served) and half of the blend row. Off "
    "when model.tabular_features is empty.",
)
def tabular_baseline(settings: PipelineSettings, patient_folds: pd.DataFrame) -> dg.MaterializeResult:
    baseline = pipeline.train_tabular_baseline(settings.config(), patient_folds)
    metadata: dict = {"enabled": baseline.enabled, "note": baseline.note}
    if (report := baseline.report) is not None:
        auc = report.metric("auc")
        metadata |= {
            "auc": auc.value,
            "auc_lo": auc.lo,
            "auc_hi": auc.hi,
            "pauc": report.metric("pauc").value,
            "n_images": report.n_images,
            "n_melanoma": report.n_melanoma,
            "features": dg.MetadataValue.json(list(baseline.features)),
            "fit_seconds": dg.MetadataValue.json(
                {str(k): round(v, 3) for k, v in baseline.fit_seconds.items()}
            ),
            "metrics": table_md(report.metrics),
            "figures": figures_md(dict(report.figures)),
        }
    return dg.MaterializeResult(value=baseline, metadata=metadata)
