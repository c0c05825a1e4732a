"""The one ``Definitions`` of the melanoma pipeline (``dagster dev -w workspace.yaml``).

Loads fast: only dagster, pydantic and pandas are imported here; torch, timm and lightning load inside
the asset bodies that need them. The training partitions (backbone x fold) come from the profile named
by ``MELANOMA_PROFILE`` (default ``demo``), read once now; so do the executor (``MELANOMA_EXECUTOR``:
``in_process`` by default, ``k8s`` for one Kubernetes Job per step) and the training step's GPU request.
"""

from __future__ import annotations

import dagster as dg

from melanoma_assets.assets.data import clean_metadata, image_cache, patient_folds, source_metadata
from melanoma_assets.assets.deployed import deployed_performance_asset
from melanoma_assets.assets.evaluation import build_evaluation, build_leaderboard, build_test_evaluation
from melanoma_assets.assets.monitoring import serving_monitor, serving_monitor_job, serving_monitor_schedule
from melanoma_assets.assets.scoring import batch_scores
from melanoma_assets.assets.serving import build_serving_model, gradcam_gallery
from melanoma_assets.assets.tabular import tabular_baseline
from melanoma_assets.assets.training import build_fold_model
from melanoma_assets.checks import (
    build_checkpoint_check,
    build_report_check,
    clean_metadata_schema,
    folds_leak_free_and_balanced,
    served_bundle_reproduces,
    test_split_untouched,
)
from melanoma_assets.executors import build_executor, executor_name_from_env, training_op_tags
from melanoma_assets.jobs import ALL_JOBS
from melanoma_assets.object_store import store_resources, store_uri_from_env
from melanoma_assets.partitions import TrainingGrid, profile_from_env
from melanoma_assets.resources import default_settings
from melanoma_assets.schedules import build_retrain_schedule
from melanoma_assets.sensors import (
    automation_sensor,
    incoming_batches_sensor,
    labelled_cases_arrived,
    source_data_changed,
)
from melanoma_ml.config import load_config


def build_definitions(
    profile: str | None = None, executor: str | None = None, artifact_store: str | None = None
) -> dg.Definitions:
    """Every asset, check, job, schedule and sensor for ``profile`` (default: ``MELANOMA_PROFILE`` or demo).

    Args:
        profile: Config profile; None reads ``MELANOMA_PROFILE``.
        executor: ``in_process``, ``k8s`` or ``celery``; None reads ``MELANOMA_EXECUTOR`` (default
            ``in_process``).
        artifact_store: ``s3://bucket/prefix`` that step values and artifact files go through (workers
            with no shared filesystem); None reads ``MELANOMA_ARTIFACT_STORE`` (unset: none).
    """
    profile = profile or profile_from_env()
    config = load_config(profile)
    grid = TrainingGrid.from_config(config)
    settings = default_settings(profile)
    store = store_resources(settings, artifact_store or store_uri_from_env())
    return dg.Definitions(
        assets=[
            source_metadata,
            clean_metadata,
            patient_folds,
            image_cache,
            build_fold_model(grid, op_tags=training_op_tags(config)),
            *(build_evaluation(grid, b) for b in grid.backbones),
            build_test_evaluation(grid),
            tabular_baseline,
            build_leaderboard(grid),
            build_serving_model(grid),
            gradcam_gallery,
            batch_scores,
            serving_monitor,
            deployed_performance_asset,
        ],
        asset_checks=[
            clean_metadata_schema,
            folds_leak_free_and_balanced,
            build_checkpoint_check(grid),
            *(build_report_check(b) for b in grid.backbones),
            served_bundle_reproduces,
            test_split_untouched,
        ],
        jobs=[*ALL_JOBS, serving_monitor_job],
        schedules=[build_retrain_schedule(), serving_monitor_schedule],
        sensors=[source_data_changed, automation_sensor, incoming_batches_sensor, labelled_cases_arrived],
        resources={"settings": settings, **store},
        executor=build_executor(executor or executor_name_from_env()),
    )


defs = build_definitions()
