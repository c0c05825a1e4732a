"""Retrain everything: after a data refresh, eager automation requests every training partition,
and once those land, evaluation and promotion follow."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from melanoma_assets.definitions import build_definitions
from melanoma_assets.groups import DATA
from melanoma_assets.resources import ArtifactStorage, DataSource, PipelineSettings, TrainingHardware


@pytest.mark.slow
def test_data_refresh_requests_every_training_partition_then_evaluation(tmp_path: Path) -> None:
    defs = build_definitions("tiny")
    settings = PipelineSettings(
        profile="tiny",
        storage=ArtifactStorage(root=str(tmp_path / "artifacts")),
        hardware=TrainingHardware(accelerator="cpu"),
        source=DataSource(),
    )
    resources = {"settings": settings, "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))}
    training_keys = set(
        defs.resolve_asset_graph().get(dg.AssetKey("fold_model")).partitions_def.get_partition_keys()
    )
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        assets = [*defs.assets, *(defs.asset_checks or [])]
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        refreshed = dg.materialize(
            assets, selection=dg.AssetSelection.groups(DATA), resources=resources, instance=instance
        )
        assert refreshed.success

        after_data = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
        requested = after_data.get_requested_partitions(dg.AssetKey("fold_model"))
        assert set(requested) == training_keys
        assert after_data.get_num_requested(dg.AssetKey("leaderboard")) == 0  # waits for training

        for key in sorted(training_keys):
            trained = dg.materialize(
                assets,
                selection=dg.AssetSelection.keys("fold_model"),
                partition_key=key,
                resources=resources,
                instance=instance,
            )
            assert trained.success
        after_training = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=after_data.cursor
        )
        evaluation_keys = [
            k for k in defs.resolve_asset_graph().get_all_asset_keys() if k.path[0] == "evaluation"
        ]
        assert evaluation_keys
        assert all(after_training.get_num_requested(k) == 1 for k in evaluation_keys)
