"""Data assets: source metadata -> cleaned table + quarantine -> patient folds -> image cache."""

import dagster as dg
import pandas as pd

from melanoma_assets.groups import DATA
from melanoma_assets.presentation import table_md
from melanoma_assets.resources import PipelineSettings
from melanoma_assets.versions import code_version
from melanoma_ml import pipeline
from melanoma_ml.metadata.fingerprint import table_fingerprint

EAGER = dg.AutomationCondition.eager()


@dg.asset(group_name=DATA, code_version=code_version("source_metadata"), kinds={"python"})
def source_metadata(settings: PipelineSettings) -> dg.MaterializeResult:
    """The dataset folder: data.source_dir, or the synthetic demo set generated under the artifact root.

    Validates the run's settings first (backbone names, folder), so bad config fails here, not in training.
    """
    config = settings.config()
    pipeline.validate_config(config)
    source = pipeline.prepare_source(config)
    return dg.MaterializeResult(
        value=source,
        data_version=dg.DataVersion(source.fingerprint[:16]),
        metadata={
            "root": dg.MetadataValue.path(str(source.root)),
            "layout": source.layout,
            "synthetic": source.synthetic,
            "fingerprint": source.fingerprint,
            "profile": settings.profile,
        },
    )


@dg.multi_asset(
    group_name=DATA,
    outs={
        "clean_metadata": dg.AssetOut(
            code_version=code_version("clean_metadata"), automation_condition=EAGER
        ),
        "quarantined_rows": dg.AssetOut(
            code_version=code_version("clean_metadata"), automation_condition=EAGER
        ),
    },
)
def clean_metadata(settings: PipelineSettings, source_metadata: pipeline.SourceInfo):
    """One row per usable image (schema.CLEAN_COLUMNS) and the rows set aside, each with its reason."""
    result = pipeline.clean_source(settings.config(), source_metadata)
    summary = result.summary
    reasons = pd.DataFrame(
        sorted(summary["quarantine_reasons"].items(), key=lambda kv: -kv[1]), columns=["reason", "rows"]
    )
    yield dg.Output(
        result.clean,
        output_name="clean_metadata",
        metadata={
            "rows": len(result.clean),
            "rows_in": summary["rows_in"],
            "melanoma": summary["melanoma"],
            "prevalence": float(summary["prevalence"]),
            "patients": summary["patients"],
            "preview": table_md(result.clean.drop(columns=["image_path", "image_sha256"], errors="ignore")),
        },
    )
    yield dg.Output(
        result.quarantine,
        output_name="quarantined_rows",
        metadata={
            "rows": len(result.quarantine),
            "reasons": table_md(reasons),
            "preview": table_md(result.quarantine),
        },
    )


@dg.asset(group_name=DATA, code_version=code_version("patient_folds"), automation_condition=EAGER)
def patient_folds(settings: PipelineSettings, clean_metadata: pd.DataFrame) -> dg.MaterializeResult:
    """Patient-grouped stratified folds: no patient in two folds, prevalence balanced across folds."""
    from melanoma_ml.folds import fold_summary

    folds = pipeline.make_folds(settings.config(), clean_metadata)
    return dg.MaterializeResult(
        value=folds,
        metadata={
            "rows": len(folds),
            "folds": int(folds["fold"].nunique()),
            "per_fold": table_md(fold_summary(folds)),
            "table_sha256": table_fingerprint(folds),
        },
    )


@dg.asset(group_name=DATA, code_version=code_version("image_cache"), automation_condition=EAGER)
def image_cache(settings: PipelineSettings, patient_folds: pd.DataFrame) -> dg.MaterializeResult:
    """Every image resized once to data.image_size; keyed by size, reused by all backbones and folds."""
    cache = pipeline.build_cache(settings.config(), patient_folds)
    return dg.MaterializeResult(
        value=cache,
        metadata={"images": len(cache.names), "size": cache.size},
    )
