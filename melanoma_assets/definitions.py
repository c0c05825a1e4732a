"""The one ``Definitions`` of the melanoma pipeline (``dagster dev -w workspace.yaml``).

Loads fast: only dagster, pydantic and pandas are imported here; torch, timm and lightning load inside
the asset bodies that need them. The training partitions (backbone x fold) come from the profile named
by ``MELANOMA_PROFILE`` (default ``demo``), read once now.
"""

from __future__ import annotations

import dagster as dg

from melanoma_assets.assets.data import clean_metadata, image_cache, patient_folds, source_metadata
from melanoma_assets.assets.evaluation import build_evaluation, build_leaderboard
from melanoma_assets.assets.serving import build_serving_model, gradcam_gallery
from melanoma_assets.assets.training import build_fold_model
from melanoma_assets.checks import (
    build_checkpoint_check,
    build_report_check,
    clean_metadata_schema,
    folds_leak_free_and_balanced,
    served_bundle_reproduces,
)
from melanoma_assets.jobs import ALL_JOBS
from melanoma_assets.partitions import TrainingGrid, profile_from_env
from melanoma_assets.resources import default_settings
from melanoma_assets.schedules import build_retrain_schedule
from melanoma_assets.sensors import automation_sensor, source_data_changed
from melanoma_ml.config import load_config


def build_definitions(profile: str | None = None) -> dg.Definitions:
    """Every asset, check, job, schedule and sensor for ``profile`` (default: ``MELANOMA_PROFILE`` or demo)."""
    profile = profile or profile_from_env()
    grid = TrainingGrid.from_config(load_config(profile))
    return dg.Definitions(
        assets=[
            source_metadata,
            clean_metadata,
            patient_folds,
            image_cache,
            build_fold_model(grid),
            *(build_evaluation(grid, b) for b in grid.backbones),
            build_leaderboard(grid),
            build_serving_model(grid),
            gradcam_gallery,
        ],
        asset_checks=[
            clean_metadata_schema,
            folds_leak_free_and_balanced,
            build_checkpoint_check(grid),
            *(build_report_check(b) for b in grid.backbones),
            served_bundle_reproduces,
        ],
        jobs=ALL_JOBS,
        schedules=[build_retrain_schedule()],
        sensors=[source_data_changed, automation_sensor],
        resources={"settings": default_settings(profile)},
        executor=dg.in_process_executor,
    )


defs = build_definitions()
