"""Serving assets: the promotion gate over the registry, and a Grad-CAM gallery of the champion."""

import dagster as dg
import pandas as pd

from melanoma_assets.groups import SERVING
from melanoma_assets.partitions import TrainingGrid
from melanoma_assets.presentation import png_md
from melanoma_assets.resources import PipelineSettings
from melanoma_assets.versions import code_version
from melanoma_ml import pipeline
from melanoma_ml.metadata.fingerprint import table_fingerprint

ROLLBACK_HELP = (
    'Roll back: python -c "from melanoma_ml.serving.registry import ModelRegistry; '
    "print(ModelRegistry('<artifact_root>/registry').rollback())\" (or rollback(to='v0001'))."
)


def build_serving_model(grid: TrainingGrid) -> dg.AssetsDefinition:
    """The promotion asset: gate the leaderboard's candidate against the champion; register on promotion."""
    from melanoma_assets.assets.evaluation import evaluation_key

    @dg.asset(
        name="serving_model",
        group_name=SERVING,
        ins={
            "leaderboard": dg.AssetIn("leaderboard"),
            "patient_folds": dg.AssetIn("patient_folds"),
            "fold_model": dg.AssetIn("fold_model"),
            "test_evaluation": dg.AssetIn("test_evaluation"),
            **{f"report_{i}": dg.AssetIn(evaluation_key(b)) for i, b in enumerate(grid.backbones)},
        },
        code_version=code_version("serving_model"),
        automation_condition=dg.AutomationCondition.eager(),
        description="Registry pointer after the promotion gate. " + ROLLBACK_HELP,
    )
    def serving_model(
        settings: PipelineSettings,
        leaderboard,
        patient_folds: pd.DataFrame,
        fold_model: dict,
        test_evaluation,
        **reports,
    ) -> dg.MaterializeResult:
        del test_evaluation  # an input for the order only: the bundle scores the test sets itself
        by_backbone = {r.name: r for r in reports.values()}
        folds_by_backbone: dict[str, list] = {}
        for result in fold_model.values():
            folds_by_backbone.setdefault(result.backbone, []).append(result)
        outcome = pipeline.promote_best(
            settings.config(),
            leaderboard,
            by_backbone,
            folds_by_backbone,
            data_version=table_fingerprint(patient_folds),
            folds_table=patient_folds,
        )
        return dg.MaterializeResult(
            value=outcome,
            metadata={
                "decision": "promoted" if outcome.decision.promote else "rejected",
                "reason": outcome.decision.reason,
                "challenger": outcome.candidate,
                "challenger_fold": outcome.fold,
                "served_model": outcome.served_model,
                "champion_before": outcome.champion_before or "none",
                "champion": outcome.champion_after or "none",
                "registered_version": outcome.registered or "none",
                "evidence": dg.MetadataValue.json(outcome.decision.evidence),
                "rollback": ROLLBACK_HELP,
            },
        )

    return serving_model


@dg.asset(
    group_name=SERVING,
    deps=["serving_model"],
    code_version=code_version("gradcam_gallery"),
    automation_condition=dg.AutomationCondition.eager(),
)
def gradcam_gallery(settings: PipelineSettings, patient_folds: pd.DataFrame) -> dg.MaterializeResult:
    """CAM overlays of the served model on a few of its validation images (melanoma and benign)."""
    gallery = pipeline.explain_gallery(settings.config(), patient_folds)
    images = "\n\n".join(
        png_md(item.path, f"{item.image_name}: target {item.target}, p={item.prob:.3f}")
        for item in gallery.items
    )
    return dg.MaterializeResult(
        value=gallery,
        metadata={
            "version": gallery.version or "none",
            "method": gallery.method,
            "target_layer": gallery.target_layer,
            "images": len(gallery.items),
            "gallery": dg.MetadataValue.md(images or gallery.note),
        },
    )
