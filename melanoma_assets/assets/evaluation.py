"""Evaluation assets: one out-of-fold report per backbone, and the leaderboard across backbones."""

import dagster as dg
import pandas as pd

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


def build_test_evaluation(grid: TrainingGrid) -> dg.AssetsDefinition:
    """Every backbone (fold-model mean) and its served fold model on the untouched test sets."""
    names = {asset_name_for(b): b for b in grid.backbones}

    @dg.asset(
        name="test_evaluation",
        group_name=EVALUATION,
        ins={
            "fold_model": dg.AssetIn("fold_model"),
            "patient_folds": dg.AssetIn("patient_folds"),
            "image_cache": dg.AssetIn("image_cache"),
            **{name: dg.AssetIn(evaluation_key(backbone)) for name, backbone in names.items()},
        },
        code_version=code_version("test_evaluation"),
        automation_condition=dg.AutomationCondition.eager(),
        description="Test AUC [CI], sensitivity/specificity at the out-of-fold threshold, calibration and "
        "subgroups on the locked test split (data.test_fraction) and each data.test_sources set, with the "
        "optimism gap (out-of-fold minus test AUC). The locked split is for display only; the external sets "
        "also feed the leaderboard's external columns and, under evaluation.select_on / "
        "evaluation.max_external_gap, the candidate's choice and the gate.",
    )
    def test_evaluation(
        settings: PipelineSettings, fold_model: dict, patient_folds, image_cache, **reports
    ) -> dg.MaterializeResult:
        by_backbone: dict[str, list] = {}
        for result in fold_model.values():
            by_backbone.setdefault(result.backbone, []).append(result)
        tested = pipeline.evaluate_on_test(
            settings.config(),
            by_backbone,
            {names[k]: v for k, v in reports.items()},
            patient_folds,
            image_cache,
        )
        metadata: dict = {
            "scored": tested.has_test,
            "results": table_md(tested.table()),
            "test_sets": dg.MetadataValue.json(tested.test_sets),
            "notes": "\n".join(tested.notes) or "none",
        }
        for r in tested.results:
            key = f"{r.test_set}/{asset_name_for(r.backbone)}/{r.kind}"
            metadata[f"{key}/test_auc"] = r.test_auc.text(show_level=False)
            metadata[f"{key}/optimism_gap"] = round(r.optimism_gap, 4)
        return dg.MaterializeResult(value=tested, metadata=metadata)

    return test_evaluation


def build_leaderboard(grid: TrainingGrid) -> dg.AssetsDefinition:
    """Backbones ranked by AUC with paired AUC-difference CIs against the best (the candidate)."""
    names = {asset_name_for(b): b for b in grid.backbones}

    @dg.asset(
        name="leaderboard",
        group_name=EVALUATION,
        ins={
            "test_evaluation": dg.AssetIn("test_evaluation"),
            "tabular_baseline": dg.AssetIn("tabular_baseline"),
            **{name: dg.AssetIn(evaluation_key(backbone)) for name, backbone in names.items()},
        },
        code_version=code_version("leaderboard"),
        automation_condition=dg.AutomationCondition.eager(),
    )
    def leaderboard(
        settings: PipelineSettings, test_evaluation, tabular_baseline, **reports
    ) -> dg.MaterializeResult:
        """Backbones ranked by out-of-fold AUC, led by their test AUC, with each external set's AUC and gap
        to out-of-fold; the promotion candidate is the image row evaluation.select_on picks (by default the
        top one). With the tabular baseline on, its tabular-only row and the blend row beside them."""
        board = pipeline.rank_backbones(
            settings.config(), {names[k]: v for k, v in reports.items()}, test_evaluation, tabular_baseline
        )
        metadata = {"candidate": board.candidate, "table": table_md(board.table)}
        if board.selection:
            metadata["selection"] = dg.MetadataValue.json(board.selection)
        if board.tabular_note:
            metadata["tabular_baseline"] = board.tabular_note
        if board.comparisons:
            metadata["comparisons"] = table_md(pd.DataFrame(list(board.comparisons)))
        return dg.MaterializeResult(value=board, metadata=metadata)

    return leaderboard
