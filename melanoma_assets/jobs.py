"""Jobs: prepare the data, train (backbone x fold partitions), evaluate and promote.

A single job cannot mix the partitioned training asset with unpartitioned ones, so "retrain everything"
is the weekly schedule running ``prepare_data`` with the downstream assets following by declarative
automation, or "Materialize all" in the UI (an asset backfill that honours the training pool).
"""

from __future__ import annotations

import dagster as dg

from melanoma_assets.groups import DATA, EVALUATION, SERVING, TRAINING

TRIGGER_TAG = "melanoma/trigger"
"""Run tag saying what started a run: ``weekly_retrain`` (schedule) or ``source_data_changed`` (sensor)."""

prepare_data_job = dg.define_asset_job(
    "prepare_data",
    selection=dg.AssetSelection.groups(DATA),
    description="Raw metadata -> cleaned table + quarantine -> patient folds -> image cache.",
)

train_job = dg.define_asset_job(
    "train_models",
    selection=dg.AssetSelection.groups(TRAINING),
    description="Train one backbone x fold partition (backfill for all of them).",
)

evaluate_and_promote_job = dg.define_asset_job(
    "evaluate_and_promote",
    selection=dg.AssetSelection.groups(EVALUATION, SERVING),
    description="Per-backbone OOF reports -> test-set evaluation -> leaderboard -> promotion gate -> Grad-CAM "
    "gallery.",
)

ALL_JOBS = [prepare_data_job, train_job, evaluate_and_promote_job]
