"""Trained fold models: one partition per backbone x fold, run in the "training" pool.

The pool's limit is how many train at once: 1 on a CPU host (dagster.yaml), the device count on a machine
with several GPUs, where each training also leases its own device (``melanoma_ml.devices``).
"""

import dagster as dg
import pandas as pd

from melanoma_assets.groups import TRAINING
from melanoma_assets.partitions import BACKBONE_DIM, FOLD_DIM, TrainingGrid
from melanoma_assets.presentation import history_png, png_md
from melanoma_assets.resources import PipelineSettings
from melanoma_assets.versions import code_version
from melanoma_ml import pipeline

TRAINING_POOL = "training"


def build_fold_model(grid: TrainingGrid, op_tags: dict[str, str] | None = None) -> dg.AssetsDefinition:
    """The partitioned training asset for ``grid`` (backbones x folds known at definitions load).

    Args:
        grid: The backbones and folds.
        op_tags: Tags of its step, e.g. the GPU request for its Kubernetes pod (``executors.training_op_tags``).
    """

    @dg.asset(
        name="fold_model",
        group_name=TRAINING,
        partitions_def=grid.partitions_def(),
        pool=TRAINING_POOL,
        code_version=code_version("fold_model"),
        automation_condition=dg.AutomationCondition.eager(),
        kinds={"pytorch"},
        op_tags=op_tags,
    )
    def fold_model(
        context: dg.AssetExecutionContext,
        settings: PipelineSettings,
        patient_folds: pd.DataFrame,
        image_cache,
    ) -> dg.MaterializeResult:
        """A timm backbone + metadata MLP trained with one fold held out; best epoch by validation AUROC."""
        keys = context.partition_key.keys_by_dimension
        backbone, fold = keys[BACKBONE_DIM], int(keys[FOLD_DIM])
        result = pipeline.train_one(settings.config(), backbone, fold, patient_folds, image_cache)
        curve = png_md(history_png(result.history, f"{backbone} fold {fold}"), "training curve")
        return dg.MaterializeResult(
            value=result,
            metadata={
                "checkpoint": dg.MetadataValue.path(str(result.checkpoint_dir)),
                # TensorBoard event files of this fit: `tensorboard --logdir <artifact_root>/checkpoints`.
                "tensorboard_logs": dg.MetadataValue.path(str(result.logs_dir)),
                "weights_sha256": result.weights_sha256,
                "best_epoch": result.best_epoch,
                "val_auroc": result.best_val_auroc,
                "epochs": result.epochs_run,
                "images_per_second": result.train_images_per_second,
                "wall_time_s": result.wall_time_s,
                "n_train": result.n_train,
                "n_val": result.n_val,
                "devices": ", ".join(result.devices),
                "training_curve": dg.MetadataValue.md(curve),
            },
        )

    return fold_model
