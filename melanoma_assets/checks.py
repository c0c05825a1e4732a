"""Asset checks with their evidence in metadata; blocking where a failure must stop the chain."""

import warnings

import dagster as dg
import pandas as pd

from melanoma_assets.assets.evaluation import evaluation_key
from melanoma_assets.partitions import TrainingGrid
from melanoma_assets.presentation import table_md
from melanoma_assets.resources import PipelineSettings
from melanoma_ml import checks as verify


def _result(problems: list[str], **metadata) -> dg.AssetCheckResult:
    text = "\n".join(f"- {p}" for p in problems) or "no problems found"
    return dg.AssetCheckResult(
        passed=not problems, metadata={"problems": dg.MetadataValue.md(text), **metadata}
    )


@dg.asset_check(
    asset="clean_metadata", blocking=True, description="Exact columns, known vocabularies, 0/1 labels."
)
def clean_metadata_schema(clean_metadata: pd.DataFrame) -> dg.AssetCheckResult:
    return _result(verify.clean_table_problems(clean_metadata), rows=len(clean_metadata))


@dg.asset_check(
    asset="patient_folds",
    blocking=True,
    description="No patient in two folds; both classes and balanced prevalence in every fold.",
)
def folds_leak_free_and_balanced(
    settings: PipelineSettings, patient_folds: pd.DataFrame
) -> dg.AssetCheckResult:
    from melanoma_ml.folds import fold_problems, fold_summary

    tolerance = settings.config().data.fold_prevalence_tolerance
    return _result(fold_problems(patient_folds, tolerance), per_fold=table_md(fold_summary(patient_folds)))


def build_checkpoint_check(grid: TrainingGrid) -> dg.AssetChecksDefinition:
    """Per-partition check of the training asset (partitioned checks are a Dagster preview feature)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return _checkpoint_check(grid)


def _checkpoint_check(grid: TrainingGrid) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset="fold_model",
        name="checkpoint_loads",
        blocking=True,
        partitions_def=grid.partitions_def(),
        additional_ins={
            "patient_folds": dg.AssetIn("patient_folds"),
            "image_cache": dg.AssetIn("image_cache"),
        },
        description="The checkpoint matches its sha256, loads without pickle and gives finite outputs.",
    )
    def checkpoint_loads(fold_model, patient_folds: pd.DataFrame, image_cache) -> dg.AssetCheckResult:
        problems, evidence = verify.checkpoint_problems(fold_model, patient_folds, image_cache)
        return _result(problems, **evidence)

    return checkpoint_loads


def build_report_check(backbone: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=evaluation_key(backbone),
        name="report_complete",
        blocking=True,
        description="Every required metric has a finite value and confidence interval.",
    )
    def report_complete(report) -> dg.AssetCheckResult:
        return _result(report.incomplete_metrics(), metrics=table_md(report.metrics))

    return report_complete


@dg.asset_check(
    asset="test_evaluation",
    blocking=True,
    additional_ins={"fold_model": dg.AssetIn("fold_model"), "patient_folds": dg.AssetIn("patient_folds")},
    description="The locked test split stayed locked: no test patient/lesion in any fold's training rows or "
    "out-of-fold predictions, and every test threshold fixed beforehand.",
)
def test_split_untouched(
    test_evaluation, fold_model: dict, patient_folds: pd.DataFrame
) -> dg.AssetCheckResult:
    from melanoma_ml.evaluation.holdout import untouched_problems

    by_backbone: dict[str, list] = {}
    for result in fold_model.values():
        by_backbone.setdefault(result.backbone, []).append(result)
    problems, evidence = untouched_problems(test_evaluation, by_backbone, patient_folds)
    return _result(problems, **evidence)


@dg.asset_check(
    asset="serving_model",
    blocking=True,
    additional_ins={"patient_folds": dg.AssetIn("patient_folds"), "image_cache": dg.AssetIn("image_cache")},
    description="The served bundle loads (sha256 verified) and reproduces its out-of-fold predictions.",
)
def served_bundle_reproduces(
    settings: PipelineSettings, serving_model, patient_folds: pd.DataFrame, image_cache
) -> dg.AssetCheckResult:
    version = serving_model.champion_after
    if version is None:
        return dg.AssetCheckResult(
            passed=True, metadata={"note": "no model is served yet: nothing to verify"}
        )
    problems, evidence = verify.bundle_reproduction(settings.config(), version, patient_folds, image_cache)
    return _result(problems, **evidence)
