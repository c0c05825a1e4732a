"""Batch scoring: each sub-folder of the drop folder is one partition of ``batch_scores``.

The ``incoming_batches`` sensor (``melanoma_assets.sensors``) adds a partition per new sub-folder and
requests its run; the asset scores that folder with the served model (``melanoma_ml.serving.batch``),
writes ``<artifact_root>/scores/<batch>.csv`` and shows the scores as a table in the UI. It depends on
``serving_model`` and records the model version that scored, so the lineage says which model produced
which scores. It is not a step of the retraining run (``melanoma_ml.pipeline.STEPS``): it is partitioned
by batch and runs when batches arrive, not when the model is retrained.
"""

import math
from pathlib import Path

import dagster as dg
import pandas as pd

from melanoma_assets.groups import SCORING
from melanoma_assets.presentation import table_md
from melanoma_assets.resources import PipelineSettings
from melanoma_assets.versions import code_version
from melanoma_ml.artifacts import artifact_paths
from melanoma_ml.serving.batch import (
    SCORE_COLUMNS,
    BatchScores,
    drop_folder,
    load_scoring_model,
    score_path,
    write_scores,
)
from melanoma_ml.serving.remote_registry import open_registry

incoming_batches = dg.DynamicPartitionsDefinition(name="incoming_batches")
"""One partition per sub-folder of the drop folder (``serving.drop_dir``), named after the folder."""

TABLE_ROWS = 50
"""Rows of the scores shown in the UI; the whole table is in the CSV (``path``) and the stored value."""

_COLUMN_TYPES = {"target": "float", "threshold": "float"}


@dg.asset(
    name="batch_scores",
    group_name=SCORING,
    partitions_def=incoming_batches,
    deps=["serving_model"],
    code_version=code_version("batch_scores"),
    description="Melanoma probabilities for one drop-folder batch (a sub-folder of serving.drop_dir), scored "
    "with the served model; the CSV has image_name, target (probability), decision, threshold, "
    "model_version and error (why a file could not be scored).",
)
def batch_scores(context: dg.AssetExecutionContext, settings: PipelineSettings) -> dg.MaterializeResult:
    config = settings.config()
    batch = context.partition_key
    folder = drop_folder(config) / batch
    bundle = load_scoring_model(open_registry(config))
    scores = score_path(
        folder,
        bundle,  # scored with the views it recorded at promotion
        max_pixels=config.serving.max_image_pixels,
        deployment_prevalence=config.serving.deployment_prevalence,
        min_age=config.serving.min_age,
        max_age=config.serving.max_age,
    )
    out = write_scores(scores, artifact_paths(config).scores(batch))
    if scores.scored.empty:
        raise dg.Failure(
            description=f"no image in {folder} could be scored (reasons in {out})",
            metadata={"not_scored": table_md(scores.failed), "path": dg.MetadataValue.path(str(out))},
        )
    return dg.MaterializeResult(value=scores.table, metadata=scores_metadata(scores, out))


def scores_metadata(scores: BatchScores, out: Path) -> dict[str, object]:
    """What the UI shows for a scored batch: counts, the model version, a summary and the first rows."""
    scored, failed = scores.scored, scores.failed
    positive = int((scored["decision"] == "positive").sum())
    summary = [
        f"**{len(scored)}** of {len(scores.table)} images scored with model **{scores.model_version}** "
        f"(threshold {scores.threshold:.4f}, {scores.views}-view TTA): **{positive}** at or "
        f"above the threshold, {len(scored) - positive} below, {len(failed)} not scored.",
        f"Input: {scores.source.description}.",
        f"{scores.images_per_second:.1f} images/s. Scores: `{out}`.",
    ]
    if len(failed):
        summary.append("**Not scored**\n\n" + table_md(failed[["image_name", "error"]]).value)
    return {
        "model_version": scores.model_version,
        "images": len(scores.table),
        "scored": len(scored),
        "not_scored": len(failed),
        "positive": positive,
        "views": scores.views,
        "path": dg.MetadataValue.path(str(out)),
        "summary": dg.MetadataValue.md("\n\n".join(summary)),
        "scores": scores_table(scores.table.head(TABLE_ROWS)),
    }


def scores_table(frame: pd.DataFrame) -> dg.TableMetadataValue:
    """The scores as a Dagster table (NaN probabilities of unscored rows as empty cells)."""
    columns = [dg.TableColumn(name, _COLUMN_TYPES.get(name, "string")) for name in SCORE_COLUMNS]
    records = [
        dg.TableRecord({name: _cell(row[name]) for name in SCORE_COLUMNS})
        for row in frame.to_dict(orient="records")
    ]
    return dg.MetadataValue.table(records=records, schema=dg.TableSchema(columns=columns))


def _cell(value: object) -> str | float | None:
    if isinstance(value, float):
        return None if math.isnan(value) else value
    return str(value)
