"""Evaluation assets: one out-of-fold report per backbone, and the leaderboard across backbones."""

import dagster as dg

from melanoma_assets.groups import EVALUATION
from melanoma_assets.partitions import TrainingGrid, asset_name_for
from melanoma_assets.presentation import figures_md, table_md
from melanoma_assets.resources import PipelineSettings
from melanoma_assets.versions import code_version
from melanoma_ml import pipeline

EVALUATION_PREFIX = "evaluation"


def evaluation_key(backbone: str) -> dg.AssetKey:
    return dg.AssetKey([EVALUATION_PREFIX, asset_name_for(backbone)])


def build_evaluation(grid: TrainingGrid, backbone: str) -> dg.AssetsDefinition:
    """The report asset of ``backbone``: depends on exactly that backbone's fold partitions."""

    @dg.asset(
        key=evaluation_key(backbone),
        group_name=EVALUATION,
        ins={
            "fold_model": dg.AssetIn(
                "fold_model", partition_mapping=dg.SpecificPartitionsPartitionMapping(grid.keys_for(backbone))
            )
        },
        code_version=code_version("evaluation"),
        automation_condition=dg.AutomationCondition.eager(),
        description=f"Out-of-fold evaluation of {backbone}: metrics with patient-bootstrap CIs, tuned "
        "threshold, subgroups, ROC/PR/calibration/confusion plots.",
    )
    def evaluation(settings: PipelineSettings, fold_model: dict) -> dg.MaterializeResult:
        report = pipeline.evaluate_backbone(settings.config(), backbone, list(fold_model.values()))
        return dg.MaterializeResult(
            value=report,
            metadata={
                "auc": report.metric("auc").value,
                "auc_lo": report.metric("auc").lo,
                "auc_hi": report.metric("auc").hi,
                "threshold": report.threshold.value,
                "n_images": report.n_images,
                "n_melanoma": report.n_melanoma,
                "metrics": table_md(report.metrics),
                "subgroups": table_md(report.subgroups, max_rows=40),
                "figures": figures_md({name: path for name, path in report.figures.items()}),
            },
        )

    return evaluation


def build_leaderboard(grid: TrainingGrid) -> dg.AssetsDefinition:
    """Backbones ranked by AUC with paired AUC-difference CIs against the best (the candidate)."""
    names = {asset_name_for(b): b for b in grid.backbones}

    @dg.asset(
        name="leaderboard",
        group_name=EVALUATION,
        ins={name: dg.AssetIn(evaluation_key(backbone)) for name, backbone in names.items()},
        code_version=code_version("leaderboard"),
        automation_condition=dg.AutomationCondition.eager(),
    )
    def leaderboard(settings: PipelineSettings, **reports) -> dg.MaterializeResult:
        """Backbones ranked by out-of-fold AUC; the top one is the promotion candidate."""
        board = pipeline.rank_backbones(settings.config(), {names[k]: v for k, v in reports.items()})
        return dg.MaterializeResult(
            value=board,
            metadata={"candidate": board.candidate, "table": table_md(board.table)},
        )

    return leaderboard
